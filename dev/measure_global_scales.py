"""make measure-global-scales: what NVFP4 global scales that the engines' fused weights do not share cost the trained
model, served the way vLLM reads them, against requant's shared scales (issue 38).

Converts the trained INT4 upstream with ct-nvfp4a16 twice, with one global scale per expert gate_proj + up_proj (the
default) and with llm-compressor's separate ones (--no-shared-global-scale), and makes the second as vLLM 0.32 reads
it (requant.testing.vllm_reads: every up_proj decoded with its gate's scale). Each is served by `requant serve` and
judged as the evaluation flow judges it (smoke test, then lm-eval GSM8K on the model's task against fp8-reference),
ct-mxfp4 and modelopt-nvfp4 (Model Optimizer's NVFP4, whose export shares the same sets' scales) beside them;
and, per routed expert up_proj, the SNR of each decode against the exact INT4 weights. Writes global-scales.json
(with date, commit and machine) and global-scales.md under --out. --weights-only keeps the served results of the
file already there (with their own date and commit) and measures the weights again (seconds).

    python -m dev.measure_global_scales [--limit 100] [--seeds 42 1234 7777] [--out results/trained] [--weights-only]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

import requant
from dev.measure_trained import MEASURES as TRAINED_MEASURES
from dev.measure_trained import REFERENCE, measure, table
from requant.bench.provenance import describe, run_info
from requant.evaluation.gsm8k import TRAINED_TASK
from requant.evaluation.judge import Protocol
from requant.formats.int4 import dequantize_int4
from requant.formats.nvfp4 import dequantize_nvfp4
from requant.testing.synth import synthesize
from requant.testing.vllm_reads import as_vllm_reads

# The code these figures measure: the trained model's, and the vLLM view
MEASURES = (*TRAINED_MEASURES, "dev/measure_global_scales.py", "requant/testing/vllm_reads.py")
VARIANTS = {"ct-mxfp4": ("ct-mxfp4", True), "ct-nvfp4a16": ("ct-nvfp4a16", True),
            "ct-nvfp4a16-unshared": ("ct-nvfp4a16", False), "modelopt-nvfp4": ("modelopt-nvfp4", True)}
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


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def _snr(exact: torch.Tensor, decoded: torch.Tensor) -> float:
    exact, decoded = exact.double(), decoded.double()
    return 10 * math.log10(float(exact.pow(2).sum()) / float((exact - decoded).pow(2).sum()))


def weight_errors(paths: dict[str, Path]) -> dict[str, Any]:
    """Per routed expert up_proj: SNR (dB) against the exact INT4 weights of its NVFP4 decode with its own global
    scale (separate scales), with its gate's (separate scales as vLLM reads them) and with the shared one; and the
    ratio of the two separate scales."""
    upstream, own, shared = (_tensors(paths[n]) for n in ("int4-upstream", "ct-nvfp4a16-unshared", "ct-nvfp4a16"))
    rows: dict[str, list[float]] = {"own": [], "as_vllm_reads": [], "shared": [], "gate_over_up_scale": []}
    for name in sorted(n for n in own if n.endswith("up_proj.weight_packed") and ".mlp.experts." in n):
        up, gate = name.removesuffix(".weight_packed"), name.removesuffix(".weight_packed").replace("up_proj", "gate_proj")
        exact = dequantize_int4(upstream[f"{up}.weight_packed"], upstream[f"{up}.weight_scale"],
                                int(upstream[f"{up}.weight_shape"][1]))
        scale, gs = own[f"{up}.weight_scale"], own[f"{up}.weight_global_scale"]
        rows["own"].append(_snr(exact, dequantize_nvfp4(own[name], scale, gs)))
        rows["as_vllm_reads"].append(_snr(exact, dequantize_nvfp4(own[name], scale, own[f"{gate}.weight_global_scale"])))
        rows["shared"].append(_snr(exact, dequantize_nvfp4(shared[name], shared[f"{up}.weight_scale"],
                                                            shared[f"{up}.weight_global_scale"])))
        rows["gate_over_up_scale"].append(float(own[f"{gate}.weight_global_scale"] / gs))
    return {"info": run_info(measures=MEASURES), "modules": len(rows["own"]),
            "summary": {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in rows.items()}}


def render(results: dict[str, Any]) -> str:
    """The served table (dev.measure_trained.table), then the up_proj weights' SNR."""
    text = table(results)
    w = results.get("weights")
    if not w:
        return text
    s = w["summary"]
    cell = lambda k: f"{s[k]['min']:.1f} / {s[k]['median']:.1f} / {s[k]['max']:.1f}"  # noqa: E731
    return text + "\n".join([
        "", f"Routed experts' up_proj ({w['modules']} modules), SNR in dB of the NVFP4 decode against the exact INT4 "
        f"weights, min / median / max; measured {describe(w['info'])}:", "",
        "| global scale | SNR (dB) |", "|---|---|",
        f"| its own (ct-nvfp4a16-unshared, llm-compressor's bytes) | {cell('own')} |",
        f"| its gate's (the same checkpoint as vLLM's fused w13 reads it) | {cell('as_vllm_reads')} |",
        f"| shared by gate_proj and up_proj (ct-nvfp4a16, requant's default) | {cell('shared')} |",
        "", f"The gate's separate global scale over the up_proj's: {cell('gate_over_up_scale')}.", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/trained"), help="global-scales.json and .md (committed)")
    p.add_argument("--work", type=Path, default=Path("measurements/global-scales"), help="checkpoints, logs, samples")
    p.add_argument("--limit", type=int, default=100, help="test items per seed (0 = all 1319)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1234, 7777])
    p.add_argument("--weights-only", action="store_true",
                   help="keep the served results of --out's file and measure the weights again")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = build(args.work / "checkpoints")
    paths["int4-upstream"] = args.work / "checkpoints" / "int4-upstream"
    served = {k: v for k, v in paths.items() if k != "int4-upstream"}
    if args.weights_only:
        results = json.loads((args.out / "global-scales.json").read_text())
    else:
        results = measure(served, args.work, Protocol(TRAINED_TASK, tuple(args.seeds), args.limit or None),
                          gsm8k=True, measures=MEASURES)
    results["weights"] = weight_errors(paths)
    (args.out / "global-scales.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "global-scales.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
