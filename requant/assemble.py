"""Turning finished layer jobs into a checkpoint: index, config, verbatim copies, model card, and the
provenance manifest, which is written last. A directory without the manifest is incomplete.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from requant.card import CardFacts, render_card
from requant.export.config import output_config, side_files
from requant.io.safetensors import sha256_file
from requant.io.storage import LocalDir
from requant.job import JobResult
from requant.manifest import (
    CONFIG_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    MANIFEST_VERSION,
    MODEL_CARD,
    UPSTREAM_CARD,
    sealed_bytes,
)
from requant.planning import Plan, output_modules

_VERSIONED = ("requant", "torch", "compressed-tensors", "safetensors", "numpy", "transformers")


JOB_FIELDS = ("job", "output_file", "sha256", "size", "bytes_in", "seconds", "host")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_json(path: Path, data: Any, pretty: bool = True) -> None:
    """``pretty=False`` for the large files (index, manifest): json's C encoder only runs without indent."""
    text = json.dumps(data, indent=2 if pretty else None, separators=None if pretty else (",", ":"),
                      ensure_ascii=False, allow_nan=False)
    path.write_text(text + "\n")


def assemble(plan: Plan, results: list[JobResult], out_dir: Path, storage, inputs: dict[str, dict],
             upstream: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Write everything but the shards (which the jobs wrote) into ``out_dir``: index, config, copied
    files, model card and, last, the manifest. Returns the manifest and the files written before it."""
    out_dir = Path(out_dir)
    written = [INDEX_FILE, CONFIG_FILE]
    results = sorted(results, key=lambda r: r.output_file)
    jobs = sorted(plan.jobs, key=lambda j: j.output_file)
    if [r.output_file for r in results] != [j.output_file for j in jobs]:
        raise ValueError(f"results of {len(results)} jobs do not match the plan's {len(jobs)} output shards")
    placed = [(job.output_file, spec) for job in jobs for spec in job.specs]  # every output tensor and its shard
    weight_map = {spec.name: file for file, spec in placed}
    total = sum(spec.nbytes for _, spec in placed)
    write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
               pretty=False)
    modules = output_modules(plan)
    write_json(out_dir / CONFIG_FILE, output_config(plan.config.raw, plan.recipe, modules))
    for name, data in side_files(plan.recipe, modules).items():
        (out_dir / name).write_bytes(data)
        written.append(name)
    for file in plan.extra_files:
        name = UPSTREAM_CARD if file == MODEL_CARD else file
        storage.copy_file_to(file, out_dir / name)
        written.append(name)
    stats = {s.name: _stat(s) for r in results for s in r.stats}
    unverified = unverified_inputs(inputs)
    outputs = {r.output_file: {"size": r.size, "sha256": r.sha256} for r in results}
    for name in written:
        outputs[name] = _output(out_dir / name)
    manifest = {
        "requant_manifest": MANIFEST_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "upstream": upstream,
        "recipe": {"name": plan.recipe.name, "format": plan.recipe.format, "source": plan.recipe.source,
                   "targets": dict(plan.recipe.targets), "overrides": [list(o) for o in plan.recipe.overrides],
                   "min_snr_db": plan.recipe.min_snr_db, "quark_version": plan.recipe.quark_version,
                   "fused_excludes": plan.recipe.fused_excludes, "mtp": plan.recipe.mtp, "export": plan.recipe.export,
                   "shared_global_scale": plan.recipe.shared_global_scale,
                   "warnings": list(plan.recipe.warnings)},
        "versions": library_versions(),
        "source": plan.source_format.record(),  # the upstream's format as config.json declares it (checked)
        "inputs": inputs,
        "outputs": dict(sorted(outputs.items())),
        "tensors": {spec.name: {"file": file, "dtype": spec.dtype, "shape": list(spec.shape)} for file, spec in placed},
        "sources": {entry.name: [spec.name for spec in task.outputs]
                    for job in jobs for task in job.tasks for entry in task.inputs},
        "stats": stats,
        "jobs": [{f: getattr(r, f) for f in JOB_FIELDS} for r in results],
    }
    if unverified:  # --unverified: the upstream publishes no digest for these, and they were converted unchecked
        manifest["unverified_inputs"] = unverified
    # the card is rendered from the manifest's facts, then listed in it
    (out_dir / MODEL_CARD).write_text(render_card(CardFacts.from_checkpoint(LocalDir(out_dir), manifest)))
    written.insert(2, MODEL_CARD)
    manifest["outputs"] = dict(sorted({**manifest["outputs"], MODEL_CARD: _output(out_dir / MODEL_CARD)}.items()))
    (out_dir / MANIFEST_FILE).write_bytes(sealed_bytes(manifest))
    return manifest, written


def _output(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def unverified_inputs(inputs: dict[str, dict]) -> list[str]:
    """The inputs a run read unchecked (``--unverified``: the upstream publishes no digest for them)."""
    return sorted(f for section in ("shards", "files") for f, d in inputs[section].items() if d.get("unverified"))


def _stat(stat) -> dict[str, Any]:
    exact = math.isinf(stat.snr_db) and stat.snr_db > 0
    return {"target": stat.target, "snr_db": None if exact else round(stat.snr_db, 3), "exact": exact,
            "rows_sampled": stat.rows_sampled, "rows": stat.rows}
