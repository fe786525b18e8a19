"""Moving whole directories into object storage, and links to stored objects for people to click."""

from __future__ import annotations

import os
from pathlib import Path

from requant.io.s3 import S3Storage


def upload_dir(local: Path, uri: str) -> None:
    """Upload every file under ``local`` to ``s3://bucket/prefix``, keeping relative names (creates the bucket)."""
    storage = S3Storage(uri)
    storage.ensure_bucket()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put_file(path.relative_to(local).as_posix(), path)


def object_url(uri: str, name: str) -> str:
    """A link for the Prefect UI: the S3 endpoint URL of an object, or a file:// path for local checkpoints."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com"
        return f"{endpoint.rstrip('/')}/{uri[5:].rstrip('/')}/{name}"
    return Path(uri, name).resolve().as_uri()
