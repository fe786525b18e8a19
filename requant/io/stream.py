"""A file of any storage as a seekable binary stream, read front to back with bounded memory.

What an uploader that takes file objects (huggingface_hub's commit API) needs from a checkpoint in object storage:
``read`` streams the object (one ranged GET from the current position, read as it goes, for S3; positioned
reads for a directory), ``seek`` starts a new stream. Memory is the buffer (``buffer_size``) and nothing else,
whatever the file's size; nothing touches the local disk.
"""

from __future__ import annotations

import io
import os

BUFFER = 1 << 20


class StorageStream(io.RawIOBase):
    """The bytes of ``path`` in ``storage``: a raw stream; :func:`open_stream` wraps it in a buffered reader."""

    def __init__(self, storage, path: str, size: int | None = None) -> None:
        self.storage, self.path = storage, path
        self.size = storage.size(path) if size is None else size
        self._pos = 0
        self._body = None  # an S3 response body, open from _pos onwards

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        position = max(0, base + offset)
        if position != self._pos:
            self._close_body()
            self._pos = position
        return self._pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self.size - self._pos)
        if want <= 0:
            self._close_body()
            return 0
        view = memoryview(buffer).cast("B")[:want]
        opener = getattr(self.storage, "open_body", None)
        if opener is None:  # a directory (or any storage without streaming): positioned reads
            data = self.storage.read_range(self.path, self._pos, self._pos + want)
            view[:] = data
            n = len(data)
        else:
            if self._body is None:
                self._body = opener(self.path, self._pos)
            n = self._body.readinto(view) if hasattr(self._body, "readinto") else _fill(self._body, view)
            if n == 0:
                from requant.errors import CheckpointError

                raise CheckpointError(f"{self.storage.uri}/{self.path}",
                                      f"short read: the object ends at {self._pos}, expected {self.size} bytes")
        self._pos += n
        return n

    def _close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def _fill(body, view: memoryview) -> int:
    data = body.read(len(view))
    view[: len(data)] = data
    return len(data)


def open_stream(storage, path: str, size: int | None = None, buffer_size: int = BUFFER) -> io.BufferedReader:
    """``path`` of ``storage`` as a buffered, seekable binary file object (an ``io.BufferedIOBase``)."""
    return io.BufferedReader(StorageStream(storage, path, size), buffer_size=buffer_size)
