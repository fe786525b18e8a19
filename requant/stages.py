"""Where a layer job's time goes, stage by stage: the seconds each stage's threads spent in it, summed over threads
(a stage's seconds over the job's wall time is how many threads it kept busy on average). Every job measures its
own (:attr:`requant.job.JobResult.stages`); ``requant bench layer`` shows them on one and on every core.

Stages: ``read`` (input spans from storage, on the read-ahead threads), ``transcode`` (a batch's decode, encode
and checks, on the transcode threads; ``snr`` is the part spent sampling each quantized tensor's error),
``write`` (output bytes into the file, on the writer thread) and ``hash_out`` (the output's sha256, on a hashing
thread beside it); and the job's coordinating thread blocked: ``wait_read``, ``wait_transcode``, ``wait_write``.

One clock per process at a time (:func:`measuring`): a process runs one layer job at a time (the local runner's
workers, the flow's Ray tasks). Timing a stage costs two ``perf_counter`` calls and a lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("read", "transcode", "snr", "write", "hash_out", "wait_read", "wait_transcode", "wait_write")


class StageClock:
    """Seconds per stage, added to from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class _Timer:
    __slots__ = ("clock", "stage", "start")

    def __init__(self, clock: StageClock, stage: str) -> None:
        self.clock, self.stage = clock, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        self.clock.add(self.stage, time.perf_counter() - self.start)
        return False


class _Off:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> bool:
        return False


_OFF = _Off()
_current: StageClock | None = None


def timed(stage: str):
    """A context manager adding the block's seconds to ``stage`` of the clock being measured (none: a no-op)."""
    clock = _current
    return _OFF if clock is None else _Timer(clock, stage)


@contextmanager
def measuring() -> Iterator[StageClock]:
    """The clock every :func:`timed` block of this process adds to while the block runs."""
    global _current
    previous, _current = _current, StageClock()
    try:
        yield _current
    finally:
        _current = previous


def totals(per_job) -> dict[str, float]:
    """``stage_<name>``: seconds summed over jobs, from each finished job's ``stages`` (JobResult.stages)."""
    out: dict[str, float] = {}
    for job_stages in per_job:
        for stage, seconds in job_stages:
            out[f"stage_{stage}"] = out.get(f"stage_{stage}", 0.0) + seconds
    return out


def describe(timings: dict[str, float]) -> str:
    """The ``stage_*`` seconds of a run's timings for people ("read 1.2 s, transcode 8.0 s, ..."); empty without."""
    return ", ".join(f"{key.removeprefix('stage_')} {seconds:.1f} s" for key, seconds in timings.items()
                     if key.startswith("stage_"))
