"""The downstream of a conversion, as plain functions the flow (and the CLI) compose:
serve both variants, smoke-test the candidate, run GSM8K on both, compare, write the report.

The reference variant's GSM8K result is cached in the reference checkpoint under
``eval/gsm8k-<protocol key>/`` (key = seeds, shots, limit, data digest, engine, lm-eval version), so a
new candidate is compared against the same reference run instead of re-evaluating it every time.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from requant.evaluation.compare import Comparison, compare, load_gate
from requant.evaluation.gsm8k import check_gsm8k_dir, run_gsm8k
from requant.evaluation.report import markdown, plot, quality_section
from requant.evaluation.results import GSM8KResult
from requant.io.safetensors import sha256_file
from requant.io.storage import open_storage
from requant.manifest import eval_path

REPORT_JSON, REPORT_MD, PLOT_PNG, SMOKE_JSON = "report.json", "report.md", "gsm8k.png", "smoke.json"


def reference_prefix(key: str) -> str:
    """Where a reference checkpoint keeps its GSM8K run for protocol ``key``."""
    return eval_path(f"gsm8k-{key}")


@dataclass(frozen=True)
class EvalSettings:
    seeds: tuple[int, ...] = (42, 1234, 7777)
    num_fewshot: int = 3
    limit: int | None = None
    gsm8k_dir: str | None = None           # None: the hub dataset (openai/gsm8k)
    num_concurrent: int = 1

    def protocol_key(self, engine: str) -> str:
        if self.gsm8k_dir:
            files = check_gsm8k_dir(self.gsm8k_dir)
            data = {split: sha256_file(path) for split, path in sorted(files.items())}
        else:
            data = "hub:openai/gsm8k"
        blob = json.dumps({"seeds": list(self.seeds), "shots": self.num_fewshot, "limit": self.limit, "data": data,
                           "engine": engine, "lm_eval": version("lm_eval")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluate_served(base_url: str, model: str, variant: str, settings: EvalSettings, out_dir: Path,
                    api_key: str | None = None, progress: bool = True) -> GSM8KResult:
    return run_gsm8k(base_url, model, variant=variant, seeds=settings.seeds, num_fewshot=settings.num_fewshot,
                     limit=settings.limit, gsm8k_dir=settings.gsm8k_dir, out_dir=out_dir,
                     num_concurrent=settings.num_concurrent, api_key=api_key, progress=progress)


def cached_result(checkpoint_uri: str, key: str) -> GSM8KResult | None:
    storage = open_storage(checkpoint_uri)
    name = f"{reference_prefix(key)}/gsm8k.json"
    if not storage.exists(name):
        return None
    return GSM8KResult.from_json(json.loads(storage.read_bytes(name)))


def write_report(candidate: GSM8KResult, reference: GSM8KResult, smoke: dict | None, out_dir: Path,
                 gate_file: str | None = None, context: dict[str, Any] | None = None) -> tuple[Comparison, str]:
    """report.json, report.md, gsm8k.png and both variants' gsm8k.json in ``out_dir``; returns (comparison, card body)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare(candidate, reference, load_gate(gate_file))
    plot(comparison, out_dir / PLOT_PNG)
    (out_dir / REPORT_MD).write_text(markdown(comparison, smoke))
    report = {"comparison": comparison.to_json(), "smoke": smoke, "context": context or {},
              "candidate": {"variant": candidate.variant, "model": candidate.model, "wall_seconds": candidate.wall_seconds},
              "reference": {"variant": reference.variant, "model": reference.model, "wall_seconds": reference.wall_seconds}}
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    for role, result in (("candidate", candidate), ("reference", reference)):
        path = out_dir / role / "gsm8k.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if smoke is not None:
        (out_dir / SMOKE_JSON).write_text(json.dumps(smoke, indent=2) + "\n")
    return comparison, quality_section(comparison, smoke, figure=eval_path(PLOT_PNG))


def scratch_dir(prefix: str = "requant-eval-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
