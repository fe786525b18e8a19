"""A run's identity and its records: the run key, one record per finished layer job, the attempts of each job.

Per run (upstream bytes, recipe and library versions hash to a run key) each finished job leaves its shard at its
final name and then a small record under ``.requant/runs/<key>/``: the record goes last, so a job is finished
exactly when its record exists and its shard still has the recorded size and sha256 (:func:`completed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time

from requant.assemble import library_versions
from requant.io.storage import WritableStorage
from requant.job import JobResult, result_from_json, result_to_json
from requant.manifest import RUN_STATE_DIR
from requant.planning import LayerJob, Plan


def run_key(plan: Plan, revision: str | None) -> str:
    """Same upstream bytes, recipe, split and library versions -> same key -> resumable outputs (the split names
    the shards, so a run split otherwise is another run)."""
    identity = {
        "source": plan.source,
        "revision": revision,
        "shards": plan.input_shards,
        "recipe": dataclasses.asdict(plan.recipe) | {"source": None},
        "expert_groups": plan.expert_groups,
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


def record_job(dest: WritableStorage, key: str, job: LayerJob, result: JobResult) -> None:
    """Mark ``job`` finished in run ``key``: called only once its shard is in place (the record goes last)."""
    dest.put_bytes(record_path(key, job), result_to_json(result))


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
