"""A plan's jobs against any destination (directory or S3), resumable and published atomically.

Pure functions: the Prefect tasks call them on Ray workers, tests call them directly. Per run
(upstream, revision, recipe and library versions hash to a run key) each finished job leaves its
shard at its final name and then a small record under ``.requant/runs/<key>/``. A rerun skips every
job whose record exists and whose shard still has the recorded size and sha256. The checkpoint is
published by writing ``requant-manifest.json`` last; a run first removes any old manifest, so a
prefix is complete exactly when its manifest exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from requant.assemble import assemble, library_versions
from requant.errors import CheckpointError, SystemFailure, os_failure
from requant.io.hf import NO_DIGEST
from requant.io.storage import Storage, WritableStorage, open_storage
from requant.job import JobResult, result_from_json, result_to_json, run_job
from requant.lease import Lease, LeaseLost, current_generation
from requant.manifest import CONFIG_FILE, MANIFEST_FILE, RUN_STATE_DIR, is_evaluation, read_manifest
from requant.plan import LayerJob, Plan

LEASE_DIR = f"{RUN_STATE_DIR}/lease"
HEADER_ALLOWANCE = 1 << 20  # per output shard, on top of its tensor bytes (JSON header, padding)


def output_lease(dest_uri: str, key: str) -> Lease:
    """The lease run ``key`` takes on ``dest_uri`` before writing anything there (see requant.lease)."""
    dest = open_storage(dest_uri, create=True)
    dest.ensure_bucket()
    return Lease(dest, LEASE_DIR, key, dest.uri)


def check_lease(dest: WritableStorage, generation: int | None) -> None:
    """Workers confirm their run still holds the output before each write; a run presumed dead and taken
    over must not overwrite the new holder's shards."""
    if generation is None:
        return
    current = current_generation(dest, LEASE_DIR)
    if current != generation:
        raise LeaseLost(f"{dest.uri}: the output's lease is generation {current}, this run holds {generation}: "
                        f"another run took over; not writing")


def scratch_dir() -> Path:
    """Where layer jobs stage their shard before upload: $REQUANT_SCRATCH, else the system temp dir."""
    return Path(os.environ.get("REQUANT_SCRATCH") or tempfile.gettempdir())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def check_scratch(job: LayerJob, scratch: Path) -> None:
    """Fail before converting when the scratch space is missing or too small for this job's shard."""
    import shutil

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


def run_key(plan: Plan, revision: str | None) -> str:
    """Same upstream bytes, recipe and library versions -> same key -> resumable outputs."""
    identity = {
        "source": plan.source,
        "revision": revision,
        "shards": plan.input_shards,
        "recipe": dataclasses.asdict(plan.recipe) | {"source": None},
        "versions": library_versions(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_path(key: str, job: LayerJob) -> str:
    return f"{RUN_STATE_DIR}/runs/{key}/{job.name}.json"


def attempts_path(key: str, job: LayerJob) -> str:
    return f"{RUN_STATE_DIR}/runs/{key}/{job.name}.attempts"


def note_attempt(dest: WritableStorage, key: str, job: LayerJob) -> int:
    """Record that this process starts ``job`` of run ``key`` (host, pid, time) and return the attempt number:
    more than 1 when a worker died mid-job and Ray, or a rerun of the same run, started it again."""
    path = attempts_path(key, job)
    attempts = json.loads(dest.read_bytes(path)) if dest.exists(path) else []
    attempts.append({"host": socket.gethostname(), "pid": os.getpid(), "started": round(time.time(), 3)})
    dest.put_bytes(path, json.dumps(attempts).encode())
    return len(attempts)


def stored_sha256(storage: WritableStorage, path: str) -> str:
    """The sha256 of an output object: recorded at upload for S3 (S3 checked the bytes then), recomputed
    for local files."""
    return storage.recorded_sha256(path) or storage.sha256(path)


def completed(dest: WritableStorage, key: str, job: LayerJob) -> JobResult | None:
    """The earlier result of ``job`` in run ``key`` if its shard is still intact, else None."""
    record = record_path(key, job)
    if not dest.exists(record):
        return None
    result = result_from_json(dest.read_bytes(record))
    head = dest.head(job.output_file)
    if head is None or head["ContentLength"] != result.size:
        return None
    if result.etag and head.get("ETag") == result.etag:  # the very object this run streamed (S3 checked its parts)
        return result
    if stored_sha256(dest, job.output_file) != result.sha256:
        return None
    return result


def published_key(dest_uri: str) -> str | None:
    """The run key of the checkpoint published at ``dest_uri`` (None when nothing complete is there)."""
    try:
        dest = open_storage(dest_uri)
        if not dest.exists(MANIFEST_FILE):
            return None
        return read_manifest(dest).get("upstream", {}).get("run_key")
    except Exception:  # unreadable or absent: treat as not published; the conversion will surface real faults
        return None


def begin_run(dest_uri: str) -> None:
    """Unpublish: whatever sits at the destination is incomplete until this run writes its manifest."""
    dest = open_storage(dest_uri, create=True)
    dest.ensure_bucket()
    if dest.exists(MANIFEST_FILE):
        dest.delete(MANIFEST_FILE)
    for name in dest.list_files():
        if is_evaluation(name):                     # evaluations of the previous contents are stale now
            dest.delete(name)


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """What a layer job reports back to the flow (across Ray and Prefect, so a plain frozen dataclass)."""

    result: JobResult
    skipped: bool  # finished by an earlier run of the same key
    upload_seconds: float = 0.0
    node: str = ""  # where it ran: the Ray node id, else the host name (set by the flow's task)
    attempt: int = 1  # which start of this job in this run finished it (see note_attempt)


def execute_job(job: LayerJob, source_uri: str, dest_uri: str, key: str, device: str = "cpu",
                threads: int = 1, lease_generation: int | None = None) -> JobOutcome:
    """Run one job unless run ``key`` already finished it; writes only while the run holds the output."""
    source, dest = open_storage(source_uri), open_storage(dest_uri, create=True)
    done = completed(dest, key, job)
    if done is not None:
        return JobOutcome(done, True)
    if hasattr(dest, "open_stream"):
        return _stream_job(job, source, dest, key, device, threads, lease_generation)
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
    check_lease(dest, lease_generation)
    dest.put_bytes(record_path(key, job), result_to_json(result))  # the record goes last
    return JobOutcome(result, False, time.perf_counter() - start, attempt=attempt)


def _stream_job(job: LayerJob, source: Storage, dest: WritableStorage, key: str, device: str, threads: int,
                lease_generation: int | None) -> JobOutcome:
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
    result = dataclasses.replace(result, etag=etag)
    check_lease(dest, lease_generation)
    dest.put_bytes(record_path(key, job), result_to_json(result))  # the record goes last
    return JobOutcome(result, False, time.perf_counter() - start, attempt=attempt)


def input_files(plan: Plan) -> list[str]:
    """Every upstream file a conversion reads: the shards, the config and the files copied verbatim."""
    return [*(f for f, _ in plan.input_shards), CONFIG_FILE, *plan.extra_files]


def unverifiable_inputs(source: Storage, files: list[str], unverified: bool = False) -> list[str]:
    """The ``files`` that ``source`` (a Hub) publishes no digest for; refused, naming the first, unless
    ``unverified``. Other sources list none: a directory publishes no digests, S3 objects are checked when read."""
    published = getattr(source, "published_digest", None)
    missing = [f for f in files if published(f) is None] if published else []
    if missing and not unverified:
        more = f" (and {len(missing) - 1} more inputs)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source.uri}/{missing[0]}", f"{NO_DIGEST}{more}; pass --unverified to convert "
                                                            "without that check")
    return missing


def input_digest(source: Storage | str, file: str, unverified: bool = False) -> dict[str, Any]:
    """Size and sha256 of the bytes of one upstream file as read now; ``source`` is a Storage or its URI.

    Where the source publishes a digest (the Hub's LFS sha256 or git blob id; the sha256 metadata of objects
    requant uploaded), the bytes read must match it: a bit flip in storage or in transit fails the run here, before
    anything is published. Elsewhere the manifest pins what was read. A Hub file with no published digest is
    refused unless ``unverified``; its record then says ``"unverified": true``.
    """
    source = open_storage(source) if isinstance(source, str) else source
    if hasattr(source, "checked_sha256"):  # the Hub: checked against its digest while downloading
        unverifiable = bool(unverifiable_inputs(source, [file], unverified))
        computed, verified = source.checked_sha256(file)
        return {"size": source.size(file), "sha256": computed, "verified_against_published": verified,
                **({"unverified": True} if unverifiable else {})}
    computed = source.sha256(file)
    published = source.recorded_sha256(file)
    if published and published != computed:
        raise CheckpointError(f"{source.uri}/{file}", f"sha256 of the bytes read ({computed[:16]}...) differs from "
                              f"the published {published[:16]}...: corrupted in storage or in transit")
    return {"size": source.size(file), "sha256": computed, "verified_against_published": bool(published)}


def input_record(source: Storage | str, plan: Plan, shards: dict[str, dict] | None = None, progress: bool = False,
                 unverified: bool = False) -> dict[str, Any]:
    """The manifest's provenance of the inputs: every shard read and every file copied. ``shards`` may
    come precomputed (the flow hashes them in parallel tasks)."""
    if shards is None:
        files = tqdm(plan.input_shards, desc="hash inputs", unit=" shards", disable=not progress)
        shards = {f: input_digest(source, f, unverified) for f, _ in files}
    return {"shards": shards,
            "files": {f: input_digest(source, f, unverified) for f in (CONFIG_FILE, *plan.extra_files)}}


def publish(plan: Plan, results: list[JobResult], source_uri: str, dest_uri: str, inputs: dict[str, Any],
            upstream: dict[str, str], lease_generation: int | None = None) -> dict[str, Any]:
    """Write index, config, copied files and model card, then the manifest, at the destination."""
    source, dest = open_storage(source_uri), open_storage(dest_uri, create=True)
    check_lease(dest, lease_generation)
    missing = sorted({j.output_file for j in plan.jobs} - {r.output_file for r in results})
    if missing:
        raise CheckpointError(dest.uri, f"cannot publish: {len(missing)} job outputs missing, e.g. {missing[0]}")
    with tempfile.TemporaryDirectory(prefix="requant-publish-") as tmp:
        manifest, files = assemble(plan, results, Path(tmp), source, inputs, upstream)
        for name in files:
            dest.put_file(name, Path(tmp) / name)
        check_lease(dest, lease_generation)
        dest.put_file(MANIFEST_FILE, Path(tmp) / MANIFEST_FILE)
    return manifest
