"""Names inside a checkpoint: relative, '/'-separated, and never leaving the root. Every storage checks the
names it is given or lists with :func:`check_relative`."""

from __future__ import annotations

from pathlib import PurePosixPath

from requant.errors import CheckpointError


def check_relative(path: str, where: str) -> str:
    """Reject absolute paths, '..' components and empty names (an index must not point outside)."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in ("..", "") for part in path.split("/")):
        raise CheckpointError(where, f"path {path!r} is outside the checkpoint (absolute or '..')")
    return str(p)
