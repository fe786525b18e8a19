"""Executing layer jobs: the one function every path runs a job through, and the pool the local runner uses.

:func:`execute_job` is what the flow's Ray tasks, ``requant convert --local`` (here or in its worker processes) and
the benchmarks run for each layer job: skip it when run ``key`` already finished it, else note the attempt,
produce the shard, move it into place while the run still holds the output, and write the job's record last.
Where the shard is produced depends on the destination: streamed part by part to object storage, written in place
in a private staging directory (the local runner's), or staged in scratch space and uploaded (a shared directory).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from requant.errors import os_failure
from requant.io.storage import LocalDir, Storage, WritableStorage, open_storage
from requant.job import JobResult, available_cores, run_job
from requant.planning import LayerJob
from requant.run.ownership import check_lease
from requant.run.records import completed, note_attempt, record_job
from requant.run.space import check_scratch, scratch_dir


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """What a layer job reports back (across Ray and Prefect, so a plain frozen dataclass)."""

    result: JobResult
    skipped: bool  # finished by an earlier run of the same key
    upload_seconds: float = 0.0
    node: str = ""  # where it ran: the Ray node id, else the host name (set by the flow's task)
    attempt: int = 1  # which start of this job in this run finished it (see records.note_attempt)


def execute_job(job: LayerJob, source: Storage | str, dest: WritableStorage | str, key: str, device: str = "cpu",
                threads: int = 1, lease_generation: int | None = None, in_place: bool = False) -> JobOutcome:
    """Run one job unless run ``key`` already finished it; writes only while the run holds the output (lease
    ``lease_generation``; None: the caller holds it otherwise). ``in_place``: ``dest`` is a private staging
    directory no reader sees, so the shard is written at its final name (fsynced before its record)."""
    source = open_storage(source) if isinstance(source, str) else source
    dest = open_storage(dest, create=True) if isinstance(dest, str) else dest
    done = completed(dest, key, job)
    if done is not None:
        return JobOutcome(done, True)
    if in_place:
        produce = _in_place
    elif hasattr(dest, "open_stream"):
        produce = _streamed
    else:
        produce = _staged
    result, attempt, upload_seconds = produce(job, source, dest, key, device, threads, lease_generation)
    check_lease(dest, lease_generation)
    record_job(dest, key, job, result)
    return JobOutcome(result, False, upload_seconds, attempt=attempt)


def _in_place(job, source, dest: LocalDir, key, device, threads, lease_generation):
    check_lease(dest, lease_generation)
    attempt = note_attempt(dest, key, job)
    return run_job(job, source, dest.root, device=device, threads=threads, fsync=True), attempt, 0.0


def _streamed(job, source, dest, key, device, threads, lease_generation):
    """The shard goes to object storage part by part while it is produced: no scratch copy, upload overlapped
    with transcoding. It becomes visible only at completion, after the lease check."""
    check_lease(dest, lease_generation)
    attempt = note_attempt(dest, key, job)
    stream = dest.open_stream(job.output_file)
    try:
        result = run_job(job, source, scratch_dir(), device=device, threads=threads, sink=stream.write)
        start = time.perf_counter()
        check_lease(dest, lease_generation)
        etag = stream.complete()
    except BaseException:
        stream.abort()
        raise
    return dataclasses.replace(result, etag=etag), attempt, time.perf_counter() - start


def _staged(job, source, dest, key, device, threads, lease_generation):
    """The shard is written in scratch space (``$REQUANT_SCRATCH``), then stored whole at the destination."""
    scratch = scratch_dir()
    check_scratch(job, scratch)
    try:
        tmp_dir = tempfile.TemporaryDirectory(prefix=f"requant-{job.name}-", dir=scratch)
    except OSError as exc:
        raise os_failure(scratch, exc, "creating the job's scratch directory") from exc
    attempt = note_attempt(dest, key, job)         # after the checks that refuse to start: this one starts
    with tmp_dir as tmp:
        result = run_job(job, source, Path(tmp), device=device, threads=threads)
        start = time.perf_counter()
        check_lease(dest, lease_generation)
        dest.put_file(job.output_file, Path(tmp) / job.output_file, sha256=result.sha256)
    return result, attempt, time.perf_counter() - start


JOB_MEMORY = 5 << 29  # 2.5 GiB: a layer job's peak RSS stays below this (make bench-layer measures it)
JOBS_PER_WORKER = 4  # worker processes only when each gets several jobs: they cost seconds to start, and a few
                     # uneven jobs finish sooner in this process, each on every core (measured: make bench-layer)


def memory_available() -> int:
    """MemAvailable from /proc/meminfo (free plus reclaimable cache), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parallel_jobs(todo: list, requested: int = 0) -> int:
    """Layer jobs to run at once: ``requested``, else one per core, as many as memory holds at JOB_MEMORY each,
    and one per JOBS_PER_WORKER jobs at most (K2.6's 62 jobs: a process per core)."""
    if requested > 0:
        return min(requested, max(1, len(todo)))
    return max(1, min(available_cores(), memory_available() // JOB_MEMORY, len(todo) // JOBS_PER_WORKER))


def execute_jobs(todo: list[LayerJob], source: Storage, dest: LocalDir, key: str, device: str, threads: int,
                 jobs: int) -> Iterator[JobOutcome]:
    """:func:`execute_job` in place for every job of ``todo``, yielding each outcome as it finishes: in this
    process, or in ``parallel_jobs`` worker processes.

    Workers die with this process (a killed conversion leaves no writer behind in its staging directory) and
    ignore Ctrl-C, which this process handles. On any failure the remaining workers are killed at once; their
    shards have no record yet, so a rerun redoes them.
    """
    workers = parallel_jobs(todo, jobs)
    if workers <= 1:
        for job in todo:
            yield execute_job(job, source, dest, key, device, threads, in_place=True)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    futures = [pool.submit(execute_job, job, source, dest, key, device, threads, None, True) for job in todo]
    try:
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # Linux: SIGKILL when the parent dies, however it dies
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)
