"""Local conversion: plan, run every layer job in this process, assemble, publish atomically.

Everything is written into a hidden staging directory next to the destination, ``.DST.partial-<run key>``,
which is renamed into place only after the manifest is written: an interrupted or failed run never leaves a
directory that looks complete. While it runs, the conversion holds a lease on the destination
(``.DST.requant-lease/``, see :mod:`requant.lease`), so a second conversion into the same destination fails
at once instead of both reporting success.

Resume: each finished layer job leaves its shard (fsynced) and then a record in the staging directory, as
the flow does in object storage. A rerun of the same run key (same upstream bytes, recipe and library
versions) after a crash or ``kill -9`` reuses every shard that still matches its record and removes the
staging directories of other run keys, which no live run can own while we hold the lease.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from requant.assemble import assemble
from requant.errors import RequantError, SystemFailure, os_failure
from requant.io.hf import pin_upstream
from requant.io.storage import LocalDir, open_storage
from requant.job import JobResult, available_cores, result_to_json, run_job
from requant.lease import Lease
from requant.manifest import RUN_STATE_DIR
from requant.pipeline import (
    HEADER_ALLOWANCE,
    completed,
    human_bytes,
    input_files,
    input_record,
    record_path,
    run_key,
    unverifiable_inputs,
)
from requant.plan import build_plan
from requant.recipe import load_recipe


@dataclass(frozen=True)
class LocalPaths:
    dst: Path
    staging: Path
    lease_dir: str  # relative to dst's parent

    @classmethod
    def for_destination(cls, dst: str, key: str) -> LocalPaths:
        dst_path = Path(dst).resolve()
        return cls(dst_path, dst_path.with_name(f".{dst_path.name}.partial-{key}"), f".{dst_path.name}.requant-lease")

    def other_staging(self) -> list[Path]:
        return [p for p in self.dst.parent.glob(f".{self.dst.name}.partial-*") if p != self.staging]


def check_free_space(path: Path, needed: int, what: str, name: Path | None = None) -> None:
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


def _run_jobs(todo: list, storage, staging: Path, device: str, threads: int, jobs: int) -> Iterator[tuple[Any, JobResult]]:
    """(job, result) for every job of ``todo`` as each finishes: here, or in ``parallel_jobs`` worker processes.

    Workers die with this process (a killed conversion leaves no writer behind in its staging directory) and
    ignore Ctrl-C, which this process handles. On any failure the remaining workers are killed at once; their
    shards have no record yet, so a rerun redoes them.
    """
    workers = parallel_jobs(todo, jobs)
    if workers <= 1:
        for job in todo:
            yield job, run_job(job, storage, staging, device=device, threads=threads, fsync=True)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    futures = {pool.submit(run_job, job, storage, staging, device, threads, True): job for job in todo}
    try:
        for future in as_completed(futures):
            yield futures[future], future.result()
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


@dataclass(frozen=True)
class LocalRun:
    manifest: dict[str, Any]
    jobs: int
    resumed: int  # layer jobs whose shards an interrupted run of the same key had finished


def convert_local(src: str, dst: str, recipe: str, **options) -> dict[str, Any]:
    """Convert ``src`` into ``dst`` with ``recipe``; returns the manifest (options: see :func:`run_local`)."""
    return run_local(src, dst, recipe, **options).manifest


def run_local(src: str, dst: str, recipe: str, *, overwrite: bool = False, device: str = "cpu",
              progress: bool = True, upstream_id: str | None = None, revision: str | None = None,
              threads: int = 0, jobs: int = 0, quark_version: str | None = None,
              fused_excludes: bool | None = None, unverified: bool = False) -> LocalRun:
    """``threads``: transcode threads per layer job (0: every core); ``jobs``: layer jobs converted at once in
    worker processes (0: sized to the cores, the memory and the work, see :func:`parallel_jobs`);
    ``quark_version``: the Quark release whose export the output equals (default: the recipe's, 0.11);
    ``fused_excludes``: False writes Quark's exclude list without the engines' fused names (default: the recipe's);
    ``unverified``: convert a Hub upstream's files it publishes no digest for (refused by default), saying so in the
    manifest and the model card."""
    src, revision, upstream_id = pin_upstream(src, revision, upstream_id)  # hf://...@main: one commit throughout
    storage = open_storage(src)
    plan = build_plan(storage, load_recipe(recipe, quark_version, fused_excludes))
    unverifiable_inputs(storage, input_files(plan), unverified)  # refused here, before anything is written
    key = run_key(plan, revision)
    paths = LocalPaths.for_destination(dst, key)
    if paths.dst.exists() and not overwrite:
        raise RequantError(f"{paths.dst}: already exists (pass --overwrite to replace it)")
    try:
        paths.dst.parent.mkdir(parents=True, exist_ok=True)
        parent = LocalDir(paths.dst.parent)
    except OSError as exc:
        raise os_failure(paths.dst.parent, exc, "creating the destination's parent directory") from exc
    try:
        lease = Lease(parent, paths.lease_dir, key, str(paths.dst)).acquire()
    except OSError as exc:
        raise os_failure(paths.dst.parent, exc, "taking the destination's lease") from exc
    try:
        if paths.dst.exists() and not overwrite:  # finished by a run that held the lease before us
            raise RequantError(f"{paths.dst}: already exists (pass --overwrite to replace it)")
        for stale in paths.other_staging():
            shutil.rmtree(stale, ignore_errors=True)
        return _convert(plan, storage, paths, key, device, threads, jobs, progress,
                        {"uri": storage.uri, "id": upstream_id or Path(storage.uri.rstrip("/")).name,
                         "revision": revision or "local", "run_key": key}, lease, unverified)
    finally:
        lease.release()
        try:
            (paths.dst.parent / paths.lease_dir).rmdir()  # empty unless another run took the lease meanwhile
        except OSError:
            pass


def _convert(plan, storage, paths: LocalPaths, key: str, device: str, threads: int, jobs: int, progress: bool,
             upstream: dict[str, str], lease: Lease, unverified: bool = False) -> LocalRun:
    staged = LocalDir(paths.staging)
    done = {job.name: completed(staged, key, job) for job in plan.jobs}
    todo = [job for job in plan.jobs if done[job.name] is None]
    check_free_space(paths.staging, sum(j.bytes_out + HEADER_ALLOWANCE for j in todo), "the output shards", paths.dst)
    try:
        paths.staging.mkdir(exist_ok=True)
    except OSError as exc:
        raise os_failure(paths.staging, exc, "creating the staging directory") from exc
    # the inputs' digests are computed on their own thread while the jobs run (hashing releases the GIL)
    hashing = ThreadPoolExecutor(1, thread_name_prefix="requant-hash-inputs")
    try:
        inputs_future = hashing.submit(input_record, storage, plan, unverified=unverified)
        results: list[JobResult] = [r for r in done.values() if r is not None]
        with tqdm(total=sum(j.bytes_in for j in plan.jobs), desc=f"convert {plan.recipe.name}", unit="B",
                  unit_scale=True, disable=not progress) as bar:
            bar.update(sum(j.bytes_in for j in plan.jobs if done[j.name] is not None))
            if len(results):
                bar.set_postfix_str(f"{len(results)} jobs resumed")
            for job, result in _run_jobs(todo, storage, paths.staging, device, threads, jobs):
                staged.put_bytes(record_path(key, job), result_to_json(result))  # the record goes last
                results.append(result)
                bar.update(job.bytes_in)
        manifest, _ = assemble(plan, results, paths.staging, storage, inputs_future.result(), upstream)
        lease.check()
        shutil.rmtree(paths.staging / RUN_STATE_DIR)
        if paths.dst.exists():
            shutil.rmtree(paths.dst)
        os.replace(paths.staging, paths.dst)
    except OSError as exc:
        # disk full, permission denied, read-only: finished shards stay staged for a rerun to resume
        raise os_failure(paths.staging, exc, "converting") from exc
    except SystemFailure:
        raise
    except BaseException as exc:
        if isinstance(exc, RequantError):  # bad input fails the same way again: nothing worth keeping
            shutil.rmtree(paths.staging, ignore_errors=True)
        raise
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
    return LocalRun(manifest, len(plan.jobs), len(plan.jobs) - len(todo))
