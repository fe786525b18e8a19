"""make measure-global-scales: what NVFP4 global scales that the engines' fused weights do not share cost the trained
model, served the way vLLM reads them, against requant's shared scales (issue 38).

Converts the trained INT4 upstream with ct-nvfp4a16 twice, with one global scale per expert gate_proj + up_proj (the
default) and with llm-compressor's separate ones (--no-shared-global-scale), and makes the second as vLLM 0.32 reads
it (requant.testing.vllm_reads: every up_proj decoded with its gate's scale). Each is served by `requant serve` and
judged as the evaluation flow judges it (smoke test, then lm-eval GSM8K on the model's task against fp8-reference),
ct-mxfp4 beside them. Writes global-scales.json (with date, commit and machine) and global-scales.md under --out.

    python -m dev.measure_global_scales [--limit 100] [--seeds 42 1234 7777] [--out results/trained]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import requant
from dev.measure_trained import REFERENCE, measure, table
from requant.evaluation.gsm8k import TRAINED_TASK
from requant.evaluation.judge import Protocol
from requant.testing.synth import synthesize
from requant.testing.vllm_reads import as_vllm_reads

VARIANTS = {"ct-mxfp4": ("ct-mxfp4", True), "ct-nvfp4a16": ("ct-nvfp4a16", True),
            "ct-nvfp4a16-unshared": ("ct-nvfp4a16", False)}
VLLM_READS = "ct-nvfp4a16-unshared:as-vllm-reads"


def build(root: Path) -> dict[str, Path]:
    upstream = root / "int4-upstream"
    if not (upstream / "config.json").exists():
        synthesize(upstream, "trained", seed=0, progress=False)
    paths = {REFERENCE: root / REFERENCE}
    if not (paths[REFERENCE] / "requant-manifest.json").exists():
        requant.convert(str(upstream), str(paths[REFERENCE]), REFERENCE, progress=False)
    for name, (recipe, shared) in VARIANTS.items():
        paths[name] = root / name
        if not (paths[name] / "requant-manifest.json").exists():
            requant.convert(str(upstream), str(paths[name]), recipe, progress=False, shared_global_scale=shared)
    paths[VLLM_READS] = root / VLLM_READS.replace(":", "-")
    if not paths[VLLM_READS].exists():
        as_vllm_reads(paths["ct-nvfp4a16-unshared"], paths[VLLM_READS])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/trained"), help="global-scales.json and .md (committed)")
    p.add_argument("--work", type=Path, default=Path("measurements/global-scales"), help="checkpoints, logs, samples")
    p.add_argument("--limit", type=int, default=100, help="test items per seed (0 = all 1319)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1234, 7777])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = build(args.work / "checkpoints")
    results = measure(paths, args.work, Protocol(TRAINED_TASK, tuple(args.seeds), args.limit or None), gsm8k=True)
    (args.out / "global-scales.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "global-scales.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
