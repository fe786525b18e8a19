"""Hugging Face Hub upstreams: ``hf://ORG/REPO@REVISION``, read by byte range over HTTPS.

The revision must be pinned (a commit sha, tag or branch); the resolved commit is what the manifest
records. Remote code in the repository is only ever copied, never imported. Needs network access and,
for gated repos, ``HF_TOKEN``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from requant.errors import CheckpointError, RequantError
from requant.io.paths import check_relative


def parse_hf_uri(uri: str) -> tuple[str, str]:
    body = uri[len("hf://") :]
    repo, sep, revision = body.partition("@")
    if not sep or not revision:
        raise RequantError(f"{uri}: pin a revision, e.g. hf://moonshotai/Kimi-K2.6@<commit>")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise RequantError(f"{uri}: expected hf://ORG/REPO@REVISION")
    return repo, revision


class HfStorage:
    def __init__(self, uri: str):
        self.repo, self.revision = parse_hf_uri(uri)
        self.uri = uri
        self._info: dict[str, dict] | None = None

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi()

    def _files(self) -> dict[str, dict]:
        """Every file of the pinned revision with its size and (for LFS files) sha256."""
        if self._info is None:
            try:
                info = self._api().model_info(self.repo, revision=self.revision, files_metadata=True)
            except Exception as exc:
                raise RequantError(f"{self.uri}: cannot read the repository ({type(exc).__name__}: {exc})") from exc
            self.resolved_revision = info.sha
            self._info = {}
            for sibling in info.siblings or []:
                check_relative(sibling.rfilename, self.uri)  # refuse traversal in names the hub returns
                lfs = getattr(sibling, "lfs", None)
                self._info[sibling.rfilename] = {"size": sibling.size, "sha256": getattr(lfs, "sha256", None)}
        return self._info

    def _url(self, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, check_relative(path, self.uri), revision=self.revision)

    def _get(self, path: str, headers: dict | None = None) -> bytes:
        import requests
        from huggingface_hub.utils import build_hf_headers

        response = requests.get(self._url(path), headers={**build_hf_headers(), **(headers or {})}, timeout=60)
        if response.status_code == 404:
            raise CheckpointError(f"{self.uri}/{path}", "file is missing")
        response.raise_for_status()
        return response.content

    def size(self, path: str) -> int:
        try:
            return int(self._files()[path]["size"])
        except KeyError as exc:
            raise CheckpointError(f"{self.uri}/{path}", "file is missing") from exc

    def read_range(self, path: str, start: int, end: int) -> bytes:
        data = self._get(path, {"Range": f"bytes={start}-{end - 1}"})
        if len(data) != end - start:
            raise CheckpointError(f"{self.uri}/{path}", f"short read: wanted bytes {start}..{end}, got {len(data)}")
        return data

    def read_bytes(self, path: str) -> bytes:
        return self._get(path)

    def exists(self, path: str) -> bool:
        return path in self._files()

    def list_files(self) -> list[str]:
        return sorted(self._files())

    def sha256(self, path: str) -> str:
        """The digest of the bytes actually downloaded (compare with ``recorded_sha256``)."""
        return hashlib.sha256(self._get(path)).hexdigest()

    def recorded_sha256(self, path: str) -> str | None:
        """The sha256 the hub publishes for an LFS file (None for small non-LFS files)."""
        return self._files().get(path, {}).get("sha256")

    def copy_file_to(self, path: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(self._get(path))
