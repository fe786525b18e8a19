"""The local runner (``requant convert --local``, :func:`requant.convert`): every layer job in this process or its
worker processes, published atomically into a directory.

Everything is written into a hidden staging directory next to the destination, ``.DST.partial-<run key>``,
which is renamed into place only after the manifest is written: an interrupted or failed run never leaves a
directory that looks complete. While it runs, the conversion holds a lease on the destination
(``.DST.requant-lease/``, see :mod:`requant.lease`), so a second conversion into the same destination fails
at once instead of both reporting success.

Resume: each finished layer job leaves its shard (fsynced) and then a record in the staging directory, as
the flow does in object storage (:mod:`requant.run.records`). A rerun of the same run key after a crash or
``kill -9`` reuses every shard that still matches its record and removes the staging directories of other run
keys, which no live run can own while we hold the lease.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from requant import stages
from requant.errors import RequantError, SystemFailure, os_failure
from requant.io.hf import pin_upstream
from requant.io.storage import LocalDir, open_storage
from requant.lease import Lease
from requant.manifest import RUN_STATE_DIR
from requant.planning import build_plan
from requant.recipe import load_recipe
from requant.run.execute import JobOutcome, execute_jobs
from requant.run.inputs import input_record
from requant.run.options import ConvertOptions, ConvertSummary
from requant.run.publish import publish
from requant.run.records import completed
from requant.run.space import HEADER_ALLOWANCE, check_free_space
from requant.run.start import start_run, summarize


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


def run_local(source: str, dest: str, recipe: str, options: ConvertOptions | None = None) -> ConvertSummary:
    """Convert ``source`` (a directory, s3:// or hf://) into the directory ``dest`` with ``recipe``."""
    options = options or ConvertOptions()
    source, revision, upstream_id = pin_upstream(source, options.revision, options.upstream_id)  # hf://...@main: one commit
    storage = open_storage(source)
    plan = build_plan(storage, load_recipe(recipe, options.quark_version, options.fused_excludes,
                                           options.shared_global_scale), options.expert_groups or 1)
    key = start_run(plan, storage, None, revision, options.unverified).key  # refusals come before any write
    paths = LocalPaths.for_destination(dest, key)
    if paths.dst.exists() and not options.overwrite:
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
        if paths.dst.exists() and not options.overwrite:  # finished by a run that held the lease before us
            raise RequantError(f"{paths.dst}: already exists (pass --overwrite to replace it)")
        for stale in paths.other_staging():
            shutil.rmtree(stale, ignore_errors=True)
        upstream = {"uri": storage.uri, "id": upstream_id or Path(storage.uri.rstrip("/")).name,
                    "revision": revision or "local", "run_key": key}
        return _convert(plan, storage, paths, key, upstream, lease, options)
    finally:
        lease.release()
        try:
            (paths.dst.parent / paths.lease_dir).rmdir()  # empty unless another run took the lease meanwhile
        except OSError:
            pass


def _convert(plan, storage, paths: LocalPaths, key: str, upstream: dict[str, str], lease: Lease,
             options: ConvertOptions) -> ConvertSummary:
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
        inputs_future = hashing.submit(_timed, input_record, storage, plan, unverified=options.unverified)
        outcomes = [JobOutcome(r, True) for r in done.values() if r is not None]
        with tqdm(total=sum(j.bytes_in for j in plan.jobs), desc=f"convert {plan.recipe.name}", unit="B",
                  unit_scale=True, disable=not options.progress) as bar:
            bar.update(sum(j.bytes_in for j in plan.jobs if done[j.name] is not None))
            if outcomes:
                bar.set_postfix_str(f"{len(outcomes)} jobs resumed")
            for outcome in execute_jobs(todo, storage, staged, key, options.device, options.threads, options.jobs):
                outcomes.append(outcome)
                bar.update(outcome.result.bytes_in)
        inputs, hash_seconds = inputs_future.result()
        manifest = publish(plan, [o.result for o in outcomes], storage, staged, inputs, upstream)
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
    timings = {"hash_inputs": hash_seconds, **stages.totals(o.result.stages for o in outcomes if not o.skipped)}
    return summarize(plan, str(paths.dst), key, outcomes, manifest, timings)


def _timed(function, *args, **kwargs):
    """``function``'s result and its wall seconds."""
    start = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - start
