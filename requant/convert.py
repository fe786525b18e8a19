"""Local conversion: plan, run every layer job in this process, assemble, publish atomically.

Everything is written into a hidden staging directory next to the destination, which is renamed into
place only after the manifest is written: an interrupted or failed run never leaves a directory that
looks complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from requant.assemble import assemble
from requant.errors import RequantError
from requant.io.storage import LocalDir, open_storage
from requant.job import JobResult, run_job
from requant.pipeline import input_record
from requant.plan import build_plan
from requant.recipe import load_recipe


def convert_local(src: str, dst: str, recipe: str, *, overwrite: bool = False, device: str = "cpu",
                  progress: bool = True, upstream_id: str | None = None, revision: str | None = None,
                  threads: int = 1) -> dict[str, Any]:
    storage = open_storage(src)
    plan = build_plan(storage, load_recipe(recipe))
    dst_path = Path(dst).resolve()
    if dst_path.exists() and not overwrite:
        raise RequantError(f"{dst_path}: already exists (pass --overwrite to replace it)")
    if not isinstance(storage, LocalDir):
        raise RequantError("local conversion reads local directories only")
    staging = dst_path.with_name(f".{dst_path.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        inputs = input_record(storage, plan, progress=progress)
        results: list[JobResult] = []
        with tqdm(total=sum(j.bytes_in for j in plan.jobs), desc=f"convert {plan.recipe.name}", unit="B",
                  unit_scale=True, disable=not progress) as bar:
            for job in plan.jobs:
                results.append(run_job(job, storage, staging, device=device, threads=threads))
                bar.update(job.bytes_in)
        upstream = {"uri": storage.uri, "id": upstream_id or Path(storage.uri).name, "revision": revision or "local"}
        manifest, _ = assemble(plan, results, staging, storage, inputs, upstream)
        if dst_path.exists():
            shutil.rmtree(dst_path)
        os.replace(staging, dst_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
