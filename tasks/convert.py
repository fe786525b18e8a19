"""Prefect tasks of the requantize flow. Each is a thin wrapper over one ``requant`` function;
the work itself (and its tests) lives in the library."""

from __future__ import annotations

import os
from typing import Any

from prefect import task

from requant import pipeline
from requant.io.storage import open_storage
from requant.plan import LayerJob, Plan, build_plan
from requant.recipe import load_recipe
from requant.verify import verify


def _node() -> str:
    """The Ray node this task runs on (or the host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return os.uname().nodename


@task(name="plan", retries=2, retry_delay_seconds=5)
def plan_checkpoint(source_uri: str, recipe: str) -> Plan:
    """Read config, index and every shard header; fail with all problems before any job runs."""
    return build_plan(open_storage(source_uri), load_recipe(recipe))


@task(name="hash-input", retries=2, retry_delay_seconds=5)
def hash_input(source_uri: str, file: str) -> dict[str, Any]:
    return pipeline.input_digest(source_uri, file)


@task(name="convert-layer", retries=2, retry_delay_seconds=2, task_run_name="convert-{job.name}")
def convert_layer(job: LayerJob, source_uri: str, dest_uri: str, key: str, device: str = "cpu",
                  threads: int = 1) -> dict[str, Any]:
    outcome = pipeline.execute_job(job, source_uri, dest_uri, key, device=device, threads=threads)
    return {"result": outcome.result, "skipped": outcome.skipped, "upload_seconds": outcome.upload_seconds,
            "node": _node()}


@task(name="publish", retries=2, retry_delay_seconds=5)
def publish_checkpoint(plan: Plan, results: list, source_uri: str, dest_uri: str, inputs: dict[str, Any],
                       upstream: dict[str, str]) -> dict[str, Any]:
    return pipeline.publish(plan, results, source_uri, dest_uri, inputs, upstream)


@task(name="verify")
def verify_checkpoint(dest_uri: str) -> dict[str, Any]:
    return verify(dest_uri)
