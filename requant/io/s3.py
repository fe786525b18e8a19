"""S3 object storage (AWS S3, MinIO, Ceph, SeaweedFS) through boto3.

Endpoint and credentials come from the standard environment: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``. Reads are
byte-range GETs; uploads are multipart with SHA256 checksums; every call retries with backoff, so a
restarting S3 server delays a run instead of failing it.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

from requant.errors import CheckpointError, RequantError
from requant.io.storage import check_relative

T = TypeVar("T")
RETRY_SECONDS = float(os.environ.get("REQUANT_S3_RETRY_SECONDS", "120"))
MULTIPART_CHUNK = 64 * 1024 * 1024


def parse_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise RequantError(f"{uri}: not an s3:// URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if len(bucket) < 3:
        raise RequantError(f"{uri}: bucket names need at least 3 characters")
    return bucket, prefix.strip("/")


def client():
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.client("s3", config=config, region_name=os.environ.get("AWS_REGION", "us-east-1"))


def _retrying(what: str, fn: Callable[[], T]) -> T:
    """Retry connection-level failures (server restarting, network blips) with exponential backoff."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import ReadTimeoutError

    delay, deadline = 0.5, time.monotonic() + RETRY_SECONDS
    while True:
        try:
            return fn()
        except (BotoConnectionError, ReadTimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise RequantError(f"{what}: object storage unreachable for {RETRY_SECONDS:.0f}s ({exc})") from exc
            time.sleep(delay)
            delay = min(delay * 2, 10)


def _missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


class S3Storage:
    """A checkpoint under ``s3://bucket/prefix``: the read side of :class:`requant.io.storage.Storage`
    plus the writes a flow needs."""

    def __init__(self, uri: str):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._client = None

    def __getstate__(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix, "uri": self.uri, "_client": None}

    @property
    def s3(self):
        if self._client is None:
            self._client = client()
        return self._client

    def key(self, path: str) -> str:
        rel = check_relative(path, self.uri)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _call(self, path: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import ClientError

        try:
            return _retrying(f"{self.uri}/{path}", fn)
        except ClientError as exc:
            if _missing(exc):
                raise CheckpointError(f"{self.uri}/{path}", "object is missing") from exc
            raise RequantError(f"{self.uri}/{path}: {exc}") from exc

    # --- read side ---------------------------------------------------------------------------------
    def size(self, path: str) -> int:
        return self._call(path, lambda: self.s3.head_object(Bucket=self.bucket, Key=self.key(path)))["ContentLength"]

    def head(self, path: str) -> dict | None:
        try:
            return self._call(path, lambda: self.s3.head_object(Bucket=self.bucket, Key=self.key(path)))
        except CheckpointError:
            return None

    def read_range(self, path: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        body = self._call(path, lambda: self.s3.get_object(Bucket=self.bucket, Key=self.key(path),
                                                           Range=f"bytes={start}-{end - 1}")["Body"].read())
        if len(body) != end - start:
            raise CheckpointError(f"{self.uri}/{path}", f"short read: wanted bytes {start}..{end}, got {len(body)}")
        return body

    def read_bytes(self, path: str) -> bytes:
        return self._call(path, lambda: self.s3.get_object(Bucket=self.bucket, Key=self.key(path))["Body"].read())

    def exists(self, path: str) -> bool:
        return self.head(path) is not None

    def list_files(self, under: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        start = base + (f"{under.strip('/')}/" if under else "")
        names: list[str] = []

        def scan() -> None:
            names.clear()
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                names.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))

        self._call(under or ".", scan)
        return sorted(names)

    def sha256(self, path: str) -> str:
        def stream() -> str:
            digest = hashlib.sha256()
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key(path))["Body"]
            for chunk in body.iter_chunks(8 << 20):
                digest.update(chunk)
            return digest.hexdigest()

        return self._call(path, stream)

    def recorded_sha256(self, path: str) -> str | None:
        """The sha256 this tool stored as metadata when it uploaded the object (S3 verified the bytes)."""
        head = self.head(path)
        return None if head is None else head.get("Metadata", {}).get("sha256")

    def copy_file_to(self, path: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        self._call(path, lambda: self.s3.download_file(self.bucket, self.key(path), str(dst)))

    # --- write side --------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            _retrying(self.uri, lambda: self.s3.head_bucket(Bucket=self.bucket))
        except ClientError:
            _retrying(self.uri, lambda: self.s3.create_bucket(Bucket=self.bucket))

    def put_file(self, path: str, local: Path, sha256: str | None = None) -> dict:
        """Multipart upload with per-part SHA256 checksums; the hex sha256 goes into object metadata."""
        from boto3.s3.transfer import TransferConfig

        sha256 = sha256 or _file_sha256(local)
        extra = {"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"}
        transfer = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK)
        self._call(path, lambda: self.s3.upload_file(str(local), self.bucket, self.key(path), ExtraArgs=extra, Config=transfer))
        return {"size": local.stat().st_size, "sha256": sha256}

    def put_bytes(self, path: str, data: bytes, if_none_match: bool = False) -> bool:
        """Write a small object. With ``if_none_match`` the write only happens if no object exists yet
        (S3 conditional write); returns False when it already existed."""
        from botocore.exceptions import ClientError

        args = {"Bucket": self.bucket, "Key": self.key(path), "Body": data, "ChecksumAlgorithm": "SHA256",
                "Metadata": {"sha256": hashlib.sha256(data).hexdigest()}}
        if if_none_match:
            args["IfNoneMatch"] = "*"
        try:
            _retrying(f"{self.uri}/{path}", lambda: self.s3.put_object(**args))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise RequantError(f"{self.uri}/{path}: {exc}") from exc
        return True

    def delete(self, path: str) -> None:
        self._call(path, lambda: self.s3.delete_object(Bucket=self.bucket, Key=self.key(path)))


def _file_sha256(path: Path) -> str:
    from requant.io.safetensors import sha256_file

    return sha256_file(path)
