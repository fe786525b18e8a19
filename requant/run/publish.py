"""Publishing a run: index, config, copied files and model card, then the manifest, last."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from requant.assemble import assemble
from requant.errors import CheckpointError
from requant.io.storage import Storage, WritableStorage, open_storage
from requant.job import JobResult
from requant.manifest import MANIFEST_FILE
from requant.planning import Plan
from requant.run.ownership import check_lease


def publish(plan: Plan, results: list[JobResult], source: Storage | str, dest: WritableStorage | str,
            inputs: dict[str, Any], upstream: dict[str, str], lease_generation: int | None = None) -> dict[str, Any]:
    """Write index, config, copied files and model card, then the manifest, at the destination; returns the
    manifest. Refuses while any job's shard is missing."""
    source = open_storage(source) if isinstance(source, str) else source
    dest = open_storage(dest, create=True) if isinstance(dest, str) else dest
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
