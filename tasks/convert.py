"""Prefect tasks of the requantize flow. Each is a thin wrapper over one ``requant`` function;
the work itself (and its tests) lives in the library."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import BaseAnnotation

import requant
from requant import run
from requant.io.storage import open_storage
from requant.planning import LayerJob, Plan


class Sealed:
    """Carries a large value (a layer job: thousands of tensor tasks) through a Ray task's parameters without
    Prefect walking into it: Prefect visits every element of a task's parameters looking for futures, in the
    driver when submitting and again in the worker (~30 s each over k26-topology's 62 jobs). Prefect's own
    ``quote`` is a tuple subclass, which Ray's argument serializer turns into a plain tuple."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __reduce__(self):
        return Sealed, (self.value,)


def _plain(value: Any) -> Any:
    """The value inside ``quote`` (large plans passed to tasks that run in the flow's process) or ``Sealed``."""
    if isinstance(value, Sealed):
        return value.value
    return value.unwrap() if isinstance(value, BaseAnnotation) else value


def task_threads(threads: int) -> int:
    """Transcode threads for a layer job: ``threads``, or for 0 the CPUs Ray reserved for this task (its
    ``num_cpus``; every core this process may use outside Ray). Ray does not pin tasks to cores, so a job that
    took every core of its node would crowd the jobs placed beside it."""
    if threads > 0:
        return threads
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
            return max(1, int(cpus))
    except ImportError:
        pass
    from requant.job import available_cores

    return available_cores()


def _node() -> str:
    """The Ray node this task runs on (or the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return os.uname().nodename


# Plans and job lists hold ~10^5 tensor descriptions: hashing them for Prefect's default input cache key
# costs more than the work, and resume is handled by requant's own job records in object storage.
@task(name="plan", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def plan_checkpoint(source_uri: str, recipe: str, quark_version: str | None = None,
                    fused_excludes: bool | None = None, shared_global_scale: bool | None = None) -> Plan:
    """Read config, index and every shard header; fail with all problems before any job runs."""
    return requant.plan(source_uri, recipe, quark_version, fused_excludes, shared_global_scale)


HASH_TASK_BYTES = 1 << 30


def hash_groups(sizes: list[tuple[str, int]], min_bytes: int = HASH_TASK_BYTES) -> list[list[str]]:
    """Files batched into hash tasks of at least ``min_bytes`` each, in order: a K2.6 shard (~9 GB) is a task of
    its own, 62 toy shards make one. A task run costs Prefect and Ray a fraction of a second whatever it reads, so
    one per small shard made verification of k26-topology's 150 MB take 17 s."""
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name, size in sizes:
        current.append(name)
        total += size
        if total >= min_bytes:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


@task(name="hash-input", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def hash_input(source_uri: str, files: list[str], unverified: bool = False) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each upstream file in ``files`` (checked against a published digest where there is one;
    see :func:`requant.run.input_digest` for ``unverified``)."""
    return {f: run.input_digest(source_uri, f, unverified) for f in files}


@task(name="hash-output", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def hash_output(dest_uri: str, files: list[str]) -> dict[str, str | None]:
    """The sha256 of each output shard in ``files`` as stored now (verification reads the shards in parallel
    tasks); None for a missing one, which verification then reports with the rest."""
    storage = open_storage(dest_uri)
    return {f: storage.sha256(f) if storage.exists(f) else None for f in files}


@task(name="convert-layer", retries=2, retry_delay_seconds=2, task_run_name="convert-{job_name}", cache_policy=NO_CACHE)
def convert_layer(job: LayerJob, job_name: str, source_uri: str, dest_uri: str, key: str, device: str = "cpu",
                  threads: int = 0, lease_generation: int | None = None) -> run.JobOutcome:
    outcome = run.execute_job(_plain(job), source_uri, dest_uri, key, device=device, threads=task_threads(threads),
                                   lease_generation=lease_generation)
    return dataclasses.replace(outcome, node=_node())


@task(name="publish", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_checkpoint(plan: Plan, results: list, source_uri: str, dest_uri: str, inputs: dict[str, Any],
                       upstream: dict[str, str], lease_generation: int | None = None) -> dict[str, Any]:
    return run.publish(_plain(plan), _plain(results), source_uri, dest_uri, inputs, upstream, lease_generation)


@task(name="verify", cache_policy=NO_CACHE)
def verify_checkpoint(dest_uri: str, digests: Mapping[str, str | None] | None = None) -> requant.VerifySummary:
    return requant.verify(dest_uri, _plain(digests))
