"""The mirror-upstream flow: copy one revision of a Hub repository into object storage, a Ray task per file
(largest first), each streamed and checked against the Hub's digest (requant.io.mirror); files already mirrored
with the same digest are skipped, so a rerun resumes. ``refs/<branch>`` moves last."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed

from requant.flows.runtime import EnvRayTaskRunner
from requant.io import mirror as mirroring
from requant.run import human_bytes
from requant.tasks.mirror import mirror_file


@flow(name="mirror-upstream", task_runner=EnvRayTaskRunner(), log_prints=True)
def mirror_upstream(upstream: str, mirror: str) -> dict[str, Any]:
    """``upstream``: hf://ORG/REPO@REVISION (a branch, tag or commit); ``mirror``: s3://bucket/prefix or a
    directory, which receives ``snapshots/<commit>/`` and ``refs/<branch>``."""
    logger = get_run_logger()
    plan = mirroring.plan_mirror(upstream, mirror)
    logger.info("mirroring %s (%d files, %s) into %s", plan.source, len(plan.files),
                human_bytes(sum(size for _, size in plan.files)), plan.snapshot)
    futures = [mirror_file.submit(plan.source, plan.snapshot, path) for path, _ in plan.files]
    done = [future.result() for future in as_completed(futures)]
    summary = mirroring.finish_mirror(plan, mirror, done)
    create_table_artifact([{k: d[k] for k in ("path", "size", "copied")} for d in sorted(done, key=lambda d: d["path"])],
                          key="mirror-files", description=f"{plan.source} -> {plan.snapshot}")
    logger.info("mirrored %s: %d files, %d copied (%s), %d already there", plan.source, summary["files"],
                summary["copied"], human_bytes(summary["bytes_copied"]), summary["files"] - summary["copied"])
    return summary
