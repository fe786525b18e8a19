"""Room to work: the scratch space a layer job stages its shard in, and the free space a conversion needs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from requant import settings
from requant.errors import SystemFailure, os_failure
from requant.planning import LayerJob

HEADER_ALLOWANCE = 1 << 20  # per output shard, on top of its tensor bytes (JSON header, padding)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def scratch_dir() -> Path:
    """Where layer jobs stage their shard before upload: $REQUANT_SCRATCH, else the system temp dir."""
    return settings.SCRATCH.get() or Path(tempfile.gettempdir())


def check_free_space(path: Path, needed: int, what: str, name: Path | str | None = None) -> None:
    """Fail before starting when ``path``'s file system cannot take ``needed`` more bytes (errors name
    ``name``, default ``path``)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        raise os_failure(probe, exc, f"checking free space for {what}") from exc
    if free < needed:
        raise SystemFailure(f"{name or path}: not enough free space for {what}: needs {human_bytes(needed)}, "
                            f"{human_bytes(free)} available on {probe}")


def check_scratch(job: LayerJob, scratch: Path) -> None:
    """Fail before converting when the scratch space is missing or too small for this job's shard."""
    needed = job.bytes_out + HEADER_ALLOWANCE
    if not scratch.is_dir():
        raise SystemFailure(f"{scratch}: scratch directory does not exist (set REQUANT_SCRATCH or TMPDIR to a "
                            f"directory with {human_bytes(needed)} free)")
    try:
        free = shutil.disk_usage(scratch).free
    except OSError as exc:
        raise os_failure(scratch, exc, "checking scratch space") from exc
    if free < needed:
        raise SystemFailure(f"{scratch}: not enough scratch space for {job.name}: needs {human_bytes(needed)}, "
                            f"{human_bytes(free)} available")
