"""``requant engine-probe``: what vLLM or SGLang decides per layer of a checkpoint, against the recipe."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from requant.errors import RequantError
from requant.export import ExportFormat, recorded_export

if TYPE_CHECKING:
    from requant.engines.decisions import Targets


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
    from requant.engines.decisions import Targets
    from requant.io.storage import open_storage
    from requant.manifest import CONFIG_FILE, MANIFEST_FILE
    from requant.recipe import load_recipe

    storage = open_storage(args.checkpoint)
    if args.recipe:
        loaded = load_recipe(args.recipe)
        recipe = {"targets": dict(loaded.targets), "mtp": loaded.mtp, "export": loaded.export}
    else:
        recipe = json.loads(storage.read_bytes(MANIFEST_FILE))["recipe"]
    targets = Targets.of(recipe, json.loads(storage.read_bytes(CONFIG_FILE)))
    export = recorded_export(recipe)
    if args.engine == "sglang":
        return probe_sglang(args.checkpoint, targets, export, load=args.load, capability=args.capability, out=args.out)
    return probe_vllm(args.checkpoint, targets, export, engine=args.engine, engines_file=args.engines_file,
                      layers_from=args.layers_from, dtype=args.dtype, out=args.out)


def probe_sglang(checkpoint: str, targets: Targets, export: ExportFormat, *, load: bool,
                 capability: str | None, out: str | None) -> int:
    """SGLang's model for the checkpoint and, where it has MTP layers, the NEXTN draft model's too."""
    from requant.engines import sglang

    (decision,) = sglang.decide([checkpoint], load=load, capability=capability or sglang.capability_for(targets.classes))
    summary = sglang.summarize(decision, targets, export)
    print(f"SGLang {decision.sglang} (stand-ins: {'; '.join(decision.stand_ins)})")
    print(sglang.format_summary(summary))
    if decision.draft is not None:
        draft = sglang.summarize(decision.draft, replace(targets, draft=True), export)
        print("\nits MTP draft model (--speculative-algorithm NEXTN):")
        print(sglang.format_summary(draft))
        summary["draft"] = draft
    return _report_mismatches(summary, "SGLang", out)


def probe_vllm(checkpoint: str, targets: Targets, export: ExportFormat, *, engine: str, engines_file: str | None,
               layers_from: str | None, dtype: str | None, out: str | None) -> int:
    import tempfile

    from requant.engines.engines import load_engines
    from requant.engines.vllm_cpu import ProbeJob, format_summary, probe_checkpoints, summarize

    spec = load_engines(engines_file)[engine]
    with tempfile.TemporaryDirectory(prefix="requant-engine-probe-") as work:
        full = ProbeJob("layers", layers_from) if layers_from else None
        probe_job = ProbeJob("probe", checkpoint, ("--dtype", dtype) if dtype else (),
                             full.records(work) if full else None)
        results = probe_checkpoints(spec, [job for job in (full, probe_job) if job], Path(work))  # one vLLM process
        if full and not results[0][1]:
            raise RequantError(f"--layers-from {layers_from}: vLLM did not serve it ({results[0][0].stopped})")
        probe, served = results[-1]
    summary = summarize(probe, targets, served, export)
    print(format_summary(summary))
    return _report_mismatches(summary, "vLLM", out)


def _report_mismatches(summary: dict, engine: str, out: str | None) -> int:
    """Print each layer where the engine differs from the recipe, and each MoE layer whose gate and up global scales
    differ (the engine keeps one of them; SGLang refuses such weights); exit 1 if there is any."""
    if out:
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    mismatches = [*summary["mismatches"], *summary.get("draft", {}).get("mismatches", [])]
    for m in mismatches:
        print(f"differs: {m['prefix']} ({m['tensor_class']}): {engine} {m['engine']}, recipe {m['recipe']}")
    split = [s for s in (*summary.get("global_scales", []), *summary.get("draft", {}).get("global_scales", []))
             if s["gate_up_differ"]]
    for s in split:
        print(f"differs: {s['prefix']} (routed_expert): gate and up global scales differ in {s['gate_up_differ']} of "
              f"{s['experts']} experts; {engine} keeps one for both")
    return 1 if mismatches or split else 0
