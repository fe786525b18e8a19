"""Where checkpoints live. The core only needs byte ranges, whole small files and a file list.

``Storage`` is what reading needs, ``WritableStorage`` what writing an output needs. ``LocalDir`` implements
both for a directory; ``S3Storage`` (requant.io.s3) both for object storage; ``HfStorage`` (requant.io.hf)
the read side for the Hugging Face Hub. ``open_storage`` picks one by URI.
Paths are always relative, '/'-separated, and may not leave the root (requant.io.paths).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import threading
from pathlib import Path
from typing import Protocol

from requant.errors import CheckpointError
from requant.io.paths import check_relative


class Storage(Protocol):
    """Read side of a checkpoint location."""

    uri: str

    def size(self, path: str) -> int: ...

    def read_range(self, path: str, start: int, end: int) -> bytes: ...

    def read_bytes(self, path: str) -> bytes: ...

    def exists(self, path: str) -> bool: ...

    def list_files(self) -> list[str]: ...

    def sha256(self, path: str) -> str:
        """The digest of the bytes as read now."""
        ...

    def recorded_sha256(self, path: str) -> str | None:
        """The digest the store published for the object when it was written (None where it keeps none)."""
        ...

    def copy_file_to(self, path: str, dst: Path) -> None: ...


class WritableStorage(Storage, Protocol):
    """What writing an output needs: layer jobs, publishing, run records and the output's lease."""

    def list_files(self, under: str = "") -> list[str]: ...

    def ensure_bucket(self) -> None: ...

    def head(self, path: str) -> dict | None:
        """``{"ContentLength": size, ...}`` of an object, or None when it does not exist."""
        ...

    def put_file(self, path: str, local: Path, sha256: str | None = None) -> dict:
        """Store a local file whole (a reader never sees part of it); returns its size and sha256."""
        ...

    def put_bytes(self, path: str, data: bytes, if_none_match: bool = False) -> bool:
        """Store a small object; with ``if_none_match`` only if none exists yet (False when one did)."""
        ...

    def delete(self, path: str) -> None: ...


class LocalDir:
    """A checkpoint directory on a local (or mounted) file system."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.uri = str(self.root)
        self._resolved: dict[str, Path] = {}
        self._handles: dict[str, int] = {}  # open descriptors of shards being range-read
        self._lock = threading.Lock()

    def _path(self, path: str) -> Path:
        full = self._resolved.get(path)
        if full is None:
            full = (self.root / check_relative(path, self.uri)).resolve()
            if self.root not in full.parents and full != self.root:
                raise CheckpointError(self.uri, f"path {path!r} resolves outside the checkpoint")
            self._resolved[path] = full
        return full

    def __getstate__(self) -> dict:
        return {"root": self.root, "uri": self.uri, "_resolved": {}, "_handles": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __del__(self) -> None:
        for fd in getattr(self, "_handles", {}).values():
            os.close(fd)

    def size(self, path: str) -> int:
        try:
            return self._path(path).stat().st_size
        except FileNotFoundError as exc:
            raise CheckpointError(f"{self.uri}/{path}", "file is missing") from exc

    def _fd(self, path: str) -> int:
        with self._lock:  # read-ahead threads share the descriptors
            fd = self._handles.get(path)
            if fd is None:
                if len(self._handles) >= 64:
                    os.close(self._handles.pop(next(iter(self._handles))))
                try:
                    fd = self._handles[path] = os.open(self._path(path), os.O_RDONLY)
                except FileNotFoundError as exc:
                    raise CheckpointError(f"{self.uri}/{path}", "file is missing") from exc
            return fd

    def read_range(self, path: str, start: int, end: int) -> bytes:
        data = os.pread(self._fd(path), end - start, start)
        if len(data) != end - start:
            raise CheckpointError(f"{self.uri}/{path}", f"short read: wanted bytes {start}..{end}, file ends first")
        return data

    def read_into(self, path: str, start: int, buf: bytearray) -> None:
        """Read ``len(buf)`` bytes from ``start`` straight into ``buf`` (no intermediate bytes object)."""
        fd, view, done = self._fd(path), memoryview(buf), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + done)
            if n == 0:
                raise CheckpointError(f"{self.uri}/{path}", f"short read: wanted bytes {start}..{start + len(view)}, "
                                                            f"file ends first")
            done += n

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._path(path).read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointError(f"{self.uri}/{path}", "file is missing") from exc

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def list_files(self, under: str = "") -> list[str]:
        base = self._path(under) if under else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not p.is_symlink()
        )

    def sha256(self, path: str) -> str:
        from requant.io.safetensors import sha256_file

        return sha256_file(self._path(path))

    def recorded_sha256(self, path: str) -> str | None:
        """A file system keeps no digest of its own: callers compute one with :meth:`sha256`."""
        return None

    def copy_file_to(self, path: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(path), dst)

    # --- write side (WritableStorage, like S3Storage) ---------------------------------------------------
    def ensure_bucket(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def head(self, path: str) -> dict | None:
        full = self._path(path)
        return {"ContentLength": full.stat().st_size} if full.is_file() else None

    def put_file(self, path: str, local: Path, sha256: str | None = None) -> dict:
        """Copy into place through a temporary name, so a reader never sees half a file."""
        from requant.io.safetensors import sha256_file

        dst = self._path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)
        return {"size": dst.stat().st_size, "sha256": sha256 or sha256_file(dst)}

    def put_bytes(self, path: str, data: bytes, if_none_match: bool = False) -> bool:
        dst = self._path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if if_none_match:
            # Create-if-absent with the content already in place: a reader must never see the new name empty
            # (open(..., "x") then write leaves that window). Write a private file, then hard-link it to the
            # name, which fails if the name exists.
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, dst)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                try:  # a file system without hard links: exclusive create, then the content
                    with open(dst, "xb") as f:
                        f.write(data)
                    return True
                except FileExistsError:
                    return False
            finally:
                tmp.unlink(missing_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dst)
        return True

    def delete(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)


def open_storage(uri: str, create: bool = False):
    """A Storage for a local directory, ``s3://bucket/prefix`` or ``hf://org/repo@revision``. Without
    ``create`` the location must exist: a missing directory or bucket fails here, in one line."""
    if uri.startswith("s3://"):
        from requant.io.s3 import S3Storage

        storage = S3Storage(uri)
        if not create:
            storage.check_bucket()
        return storage
    if uri.startswith("hf://"):
        from requant.io.hf import HfStorage

        return HfStorage(uri)
    if "://" in uri:
        raise CheckpointError(uri, "unsupported URI scheme (use a directory, s3:// or hf://)")
    if create:
        Path(uri).mkdir(parents=True, exist_ok=True)
    if not Path(uri).is_dir():
        raise CheckpointError(uri, "not a directory")
    return LocalDir(uri)
