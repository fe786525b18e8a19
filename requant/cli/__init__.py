"""The ``requant`` command line. Errors a user can fix print as one line and exit with status 2.

The library imports no orchestration: ``convert`` without ``--local`` runs the requantize flow through the
``convert_flow`` callable that the ``requant`` console script (``flows.cli``) passes in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from requant.api_key import api_key
from requant.constants import QUARK_RELEASES
from requant.errors import ProblemsError, RequantError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="requant", description="Re-quantize Kimi-K2.6-family MoE checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic upstream checkpoint with Kimi-K2.6's layout")
    s.add_argument("dst")
    s.add_argument("--profile", default="tiny", choices=["tiny", "trained", "k26-topology", "k26-layer"],
                   help="tiny/k26-topology: random weights; trained: the model make train-model trained (INT4 experts); "
                        "k26-layer: K2.6's real widths, one dense and one MoE layer (~10.8 GB)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--experts", type=int, help="routed experts per MoE layer (default: the profile's; k26-layer: 384)")

    c = sub.add_parser("convert", help="convert an upstream checkpoint with a recipe")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--recipe", required=True, help="built-in recipe name or path to a recipe YAML")
    c.add_argument("--quark-version", choices=list(QUARK_RELEASES),
                   help="the AMD Quark release whose file-to-file export the output equals byte for byte (default: the "
                        "recipe's, 0.11 = Quark 0.11.2; 0.13 quantizes the exact FP32 decode of INT4 weights)")
    c.add_argument("--no-fused-excludes", dest="fused_excludes", action="store_const", const=False,
                   help="write Quark's exclude list exactly (default: it also names the fused modules SGLang and vLLM "
                        "build from excluded modules, e.g. mlp.gate_up_proj, so that SGLang keeps them BF16)")
    c.add_argument("--local", action="store_true",
                   help="run every layer job in this process (default: the Prefect flow on Ray; SRC/DST may be s3://)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a converted checkpoint already at DST (default: refuse; the same run is resumed or, "
                        "once finished, verified and reused by the flow)")
    c.add_argument("--device", default="cpu",
                   help="torch device for the kernels (cpu, cuda, cuda:1, ...; ROCm: cuda); the flow reserves one GPU "
                        "per layer job for a cuda device")
    c.add_argument("--threads", type=int, default=0,
                   help="transcode threads per layer job (default 0: with --local every core this process may use; "
                        "the flow: 1 per Ray task)")
    c.add_argument("--jobs", type=int, default=0,
                   help="--local: layer jobs converted at once in worker processes (default 0: one per core, as many "
                        "as memory holds at 2.5 GiB each, and only with at least 4 jobs per worker)")
    c.add_argument("--unverified", action="store_true",
                   help="convert upstream files the Hub publishes no digest for (neither an LFS sha256 nor a git blob "
                        "id), unchecked; the terminal, the manifest (unverified_inputs) and the model card say so "
                        "(default: refuse them)")
    c.add_argument("--upstream-id", help="upstream model id recorded in the manifest (default: directory name)")
    c.add_argument("--revision", help="upstream revision recorded in the manifest")

    m = sub.add_parser("mirror", help="copy a Hub revision (hf://ORG/REPO@REV) into s3://... or a directory as "
                                      "snapshots/<commit>/ + refs/<branch>, each file checked; resumable")
    m.add_argument("src", help="hf://ORG/REPO@REVISION (a branch, tag or commit)")
    m.add_argument("dst", help="s3://bucket/prefix or a directory")
    m.add_argument("--workers", type=int, default=4, help="files copied at once (default 4)")

    h = sub.add_parser("hub", help="a local Hugging Face Hub for demos and tests (point HF_ENDPOINT at it)")
    hs = h.add_subparsers(dest="hub_command", required=True)
    hserve = hs.add_parser("serve", help="serve the repositories under ROOT until Ctrl-C")
    hserve.add_argument("root")
    hserve.add_argument("--host", default="127.0.0.1")
    hserve.add_argument("--port", type=int, default=8090)
    hpub = hs.add_parser("publish", help="commit a directory as the new head of a branch of ORG/REPO under ROOT "
                                         "(a running `hub serve` sees it at once)")
    hpub.add_argument("root")
    hpub.add_argument("repo", help="ORG/REPO")
    hpub.add_argument("dir", help="the directory whose files the commit holds")
    hpub.add_argument("--branch", default="main")
    hpub.add_argument("--message", default="Upload checkpoint")

    v = sub.add_parser("verify", help="check an output checkpoint against its manifest")
    v.add_argument("path")

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="kernel and whole-checkpoint benchmarks against Quark 0.11")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--out", help="also write results.json and results.md into this directory")
    b.add_argument("--skip-checkpoint", action="store_true", help="kernel benchmarks only")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--upstream", help="existing k26-topology upstream to convert (default: synthesize one)")
    b.add_argument("--layers", type=int, default=9,
                   help="decoder layers of the synthesized k26-topology model (61 = all; Quark takes over an hour then)")
    b.add_argument("--layer", action="store_true",
                   help="instead: one K2.6 layer at real widths (synth k26-layer) on tmpfs and on disk, each against "
                        "its roofline measured in the same run (make bench-layer adds S3 and the flow on Ray)")
    b.add_argument("--peers", action="store_true",
                   help="requant against Quark 0.11.2, Quark 0.13 (1 process and one worker per core) and "
                        "llm-compressor 0.14's model_free_ptq on synth k26-layer (--experts, --tmpfs, --upstream apply), "
                        "each a whole process tree: wall, peak RSS, outputs checked against each other")
    b.add_argument("--hub", action="store_true",
                   help="k26-layer read from requant's local Hub: layer jobs from hf:// against a plain download of "
                        "the same bytes (--experts, --tmpfs apply)")
    b.add_argument("--experts", type=int, default=96, help="--layer/--hub: routed experts (384 = a whole K2.6 layer, "
                                                           "10.8 GB)")
    b.add_argument("--recipe", default="amd-kimi-mxfp4", help="--layer: recipe to convert with")
    b.add_argument("--tmpfs", default="/dev/shm", help="--layer: a tmpfs directory ('' to skip)")
    b.add_argument("--disk", default=".", help="--layer: a directory on disk ('' to skip)")

    sv = sub.add_parser("serve", help="OpenAI-compatible reference server for a checkpoint (dir or s3://)")
    sv.add_argument("checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=api_key(),
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $REQUANT_API_KEY; prefer the variable, "
                         "command lines are visible to other users)")
    sv.add_argument("--served-model-name", help="model name clients send (default: the checkpoint's last path part)")
    sv.add_argument("--max-model-len", type=int, default=8192, help="prompt + completion tokens per request")
    sv.add_argument("--max-pending", type=int, default=16, help="requests in flight before 429")
    sv.add_argument("--max-body-bytes", type=int, default=4 << 20)
    sv.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may stall (then 408)")
    sv.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    sv.add_argument("--device", default="cpu", help="torch device the model runs on (cpu, cuda, cuda:1; ROCm: cuda)")
    sv.add_argument("--log-level", default="warning")

    sm = sub.add_parser("smoke", help="smoke-test a running OpenAI-compatible server (exit 1 on failure)")
    sm.add_argument("base_url", help="server root, e.g. http://127.0.0.1:8000")
    sm.add_argument("--model", help="served model name (default: the first of /v1/models)")
    sm.add_argument("--reference-url", help="a server with the reference variant, for the numeric agreement check")
    sm.add_argument("--reference-model")
    sm.add_argument("--limits", help="YAML overriding requant/engines/smoke.yaml")
    sm.add_argument("--gsm8k-dir", help="compare on this task's test questions (a directory or requant:trained) "
                    "instead of the built-in prompts")
    sm.add_argument("--checkpoint", help="the checkpoint the server serves (a directory or s3:// URI): with "
                    "--reference-checkpoint, a failed agreement says which layer and experts differ")
    sm.add_argument("--reference-checkpoint", help="the checkpoint the reference server serves")
    sm.add_argument("--out", help="write the result JSON here")

    lc = sub.add_parser("localize", help="which layer and experts of a checkpoint depart from a reference "
                        "(both loaded here; exit 1 when a part is flagged)")
    lc.add_argument("checkpoint", help="the candidate checkpoint (a directory or s3:// URI)")
    lc.add_argument("reference", help="the reference checkpoint")
    lc.add_argument("--gsm8k-dir", help="run this task's test questions (a directory or requant:trained) instead "
                    "of the smoke test's built-in prompts")
    lc.add_argument("--max-gib", type=float, default=None, help="refuse above this many GiB of both checkpoints "
                    "(default: no limit here; the smoke test's is in smoke.yaml)")
    lc.add_argument("--out", help="write the result JSON here")

    ev = sub.add_parser("eval", help="GSM8K through lm-eval against a running server's /v1/completions")
    ev.add_argument("base_url")
    ev.add_argument("--model", help="served model name (default: the first of /v1/models)")
    ev.add_argument("--variant", help="name recorded in the result (default: the model name)")
    ev.add_argument("--seeds", default="42,1234,7777", help="comma-separated; one lm-eval run per seed")
    ev.add_argument("--num-fewshot", type=int, default=3)
    ev.add_argument("--limit", type=int, help="items per seed (default: all 1319)")
    ev.add_argument("--gsm8k-dir", help="directory with train.jsonl and test.jsonl, or requant:trained for the "
                    "trained model's own task (default: the hub's openai/gsm8k)")
    ev.add_argument("--num-concurrent", type=int, default=1)
    ev.add_argument("--out", default="gsm8k-eval", help="output directory (per-seed sample logs, gsm8k.json)")

    bs = sub.add_parser("bench-serve", help="reference-server tokens/s per variant and lm-eval time per 100 items")
    bs.add_argument("--out", help="write serve.json and serve.md here")
    bs.add_argument("--eval-items", type=int, default=20, help="GSM8K items for the lm-eval timing (0 = skip)")
    bs.add_argument("--gsm8k-dir", help="offline GSM8K for the lm-eval timing (default: $REQUANT_GSM8K_DIR or shared/data/gsm8k)")

    ep = sub.add_parser("engine-probe", help="start vLLM on a checkpoint (or build SGLang's model for it) and show "
                                             "what it decides per layer vs the recipe (exit 1 where they differ)")
    ep.add_argument("checkpoint", help="a converted checkpoint (dir or s3://; a dir for sglang)")
    ep.add_argument("--engine", default="vllm-cpu",
                    help="a vLLM engine of engines.yaml (default: vllm-cpu), or sglang: SGLang's own model classes "
                         "built on the meta device in .venv-sglang (make sglang-venv), no GPU needed")
    ep.add_argument("--load", action="store_true",
                    help="sglang: build on the CPU and feed every tensor to SGLang's weight loaders (small checkpoints)")
    ep.add_argument("--capability", default="9.5",
                    help="sglang: the GPU's compute capability its Quark config checks (9.5 MI355X, 9.4 MI300X)")
    ep.add_argument("--engines-file", help="YAML adding or overriding engines")
    ep.add_argument("--recipe", help="compare with this recipe instead of the one in the checkpoint's manifest")
    ep.add_argument("--dtype", help="vLLM --dtype (quantized checkpoints need bfloat16 or float16)")
    ep.add_argument("--layers-from", metavar="CHECKPOINT",
                    help="first start vLLM on this checkpoint of the same architecture that it serves (e.g. the "
                         "bf16-staging variant), so that layers it never builds for CHECKPOINT are still decided")
    ep.add_argument("--out", help="write the per-class summary as JSON")
    cp = sub.add_parser("compare", help="compare two `requant eval` outputs; report + plot; exit 1 if the gate "
                                           "fails, 3 if inconclusive")
    cp.add_argument("candidate", help="candidate's eval directory (holds gsm8k.json)")
    cp.add_argument("reference", help="reference's eval directory")
    cp.add_argument("--gate", help="gate YAML (default: requant/evaluation/gate.yaml)")
    cp.add_argument("--smoke", help="a `requant smoke --out` JSON to include")
    cp.add_argument("--out", default="gsm8k-report", help="directory for report.json, report.md, gsm8k.png")
    return p


def _hub(args: argparse.Namespace) -> int:
    from requant.testing import hubserver

    if args.hub_command == "publish":
        commit = hubserver.publish_dir(args.root, args.repo, args.dir, branch=args.branch, message=args.message)
        print(f"{args.repo}@{args.branch} is now {commit}")
        return 0
    import threading

    Path(args.root).mkdir(parents=True, exist_ok=True)
    with hubserver.serve_hub(args.root, host=args.host, port=args.port) as hub:
        print(f"serving {args.root}: export HF_ENDPOINT={hub.url}  (Ctrl-C stops)", flush=True)
        threading.Event().wait()
    return 0


def _engine_probe(args: argparse.Namespace) -> int:
    import tempfile

    from requant.engines.engines import load_engines
    from requant.engines.vllm_cpu import format_summary, probe_checkpoint, summarize
    from requant.io.storage import open_storage
    from requant.manifest import MANIFEST_FILE
    from requant.recipe import load_recipe

    if args.recipe:
        targets = dict(load_recipe(args.recipe).targets)
    else:
        targets = json.loads(open_storage(args.checkpoint).read_bytes(MANIFEST_FILE))["recipe"]["targets"]
    if args.engine == "sglang":
        from requant.engines import sglang

        (decision,) = sglang.decide([args.checkpoint], load=args.load, capability=args.capability)
        summary = sglang.summarize(decision, targets)
        print(f"SGLang {decision.sglang} (stand-ins: {'; '.join(decision.stand_ins)})")
        print(sglang.format_summary(summary))
        return _report_mismatches(summary, "SGLang", args.out)
    spec = load_engines(args.engines_file)[args.engine]
    with tempfile.TemporaryDirectory(prefix="requant-engine-probe-") as work:
        layers = None
        if args.layers_from:
            full, served = probe_checkpoint(spec, args.layers_from, Path(work) / "layers")
            if not served:
                raise RequantError(f"--layers-from {args.layers_from}: vLLM did not serve it ({full.stopped})")
            layers = Path(work) / "layers" / "vllm-probe.jsonl"
        probe, served = probe_checkpoint(spec, args.checkpoint, Path(work) / "probe", reference_layers=layers,
                                         extra_args=("--dtype", args.dtype) if args.dtype else ())
    summary = summarize(probe, targets, served)
    print(format_summary(summary))
    return _report_mismatches(summary, "vLLM", args.out)


def _report_mismatches(summary: dict, engine: str, out: str | None) -> int:
    if out:
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    for m in summary["mismatches"]:
        print(f"differs: {m['prefix']} ({m['tensor_class']}): {engine} {m['engine']}, recipe {m['recipe']}")
    return 1 if summary["mismatches"] else 0


def _warn_unverified(src: str, files: list[str]) -> None:
    """One line on the terminal for a conversion that read inputs unchecked (``--unverified``)."""
    if files:
        print(f"warning: {src}: {len(files)} input files converted unverified (the Hub publishes no digest for "
              f"them; --unverified), e.g. {files[0]}; the manifest (unverified_inputs) and the model card say so",
              file=sys.stderr)


ConvertFlow = Callable[..., dict[str, Any]]  # requantize's keyword arguments -> its summary


def main(argv: list[str] | None = None, convert_flow: ConvertFlow | None = None) -> int:
    """Run one command; ``convert_flow`` runs ``convert`` without ``--local`` (see flows.cli)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args, convert_flow)
    except ProblemsError as exc:
        print(f"requant {args.command}: error: {exc}", file=sys.stderr)
        for problem in exc.problems[1:]:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except RequantError as exc:
        print(f"requant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a failure the library did not name more precisely: still one line, status 2
        from requant.errors import os_failure

        print(f"requant {args.command}: error: {os_failure('?', exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"requant {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, convert_flow: ConvertFlow | None) -> int:
    if args.command == "synth":
        from requant.testing.synth import synthesize

        print(synthesize(args.dst, args.profile, args.seed, experts=args.experts))
    elif args.command == "convert":
        if not args.local:
            if convert_flow is None:
                raise RequantError("convert without --local runs the requantize flow: use the `requant` command "
                                   "(or python -m flows.cli), or pass --local to convert in this process")
            if args.jobs:
                raise RequantError("--jobs sizes --local's worker processes; the flow runs one Ray task per layer job "
                                   "(give it more CPUs with the flow's num_cpus)")
            summary = convert_flow(upstream=args.src, output=args.dst, recipe=args.recipe, revision=args.revision,
                                   upstream_id=args.upstream_id, device=args.device, threads=args.threads or 1,
                                   quark_version=args.quark_version, fused_excludes=args.fused_excludes,
                                   overwrite=args.overwrite, unverified=args.unverified)
            _warn_unverified(args.src, summary.get("unverified_inputs", []))
            print(f"wrote {args.dst}: {summary['tensors']} tensors, {summary['jobs']} layer jobs ({summary['skipped']} resumed)")
            return 0
        from requant.convert import run_local

        run = run_local(args.src, args.dst, args.recipe, overwrite=args.overwrite, device=args.device,
                        upstream_id=args.upstream_id, revision=args.revision, threads=args.threads,
                        jobs=args.jobs, quark_version=args.quark_version, fused_excludes=args.fused_excludes,
                        unverified=args.unverified)
        manifest = run.manifest
        for warning in manifest["recipe"]["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        _warn_unverified(args.src, manifest.get("unverified_inputs", []))
        resumed = f" ({run.resumed} of {run.jobs} layer jobs resumed from an interrupted run)" if run.resumed else ""
        print(f"wrote {args.dst}: {len(manifest['tensors'])} tensors in "
              f"{sum(1 for f in manifest['outputs'] if f.endswith('.safetensors'))} shards{resumed}")
    elif args.command == "mirror":
        from tqdm import tqdm

        from requant.io.mirror import mirror_local

        with tqdm(desc="mirror", unit=" files") as bar:
            summary = mirror_local(args.src, args.dst, workers=args.workers, on_file=lambda _: bar.update())
        print(f"mirrored {summary['source']} into {summary['snapshot']}: {summary['files']} files, "
              f"{summary['copied']} copied, {summary['files'] - summary['copied']} already there")
    elif args.command == "hub":
        return _hub(args)
    elif args.command == "verify":
        from requant.verify import verify

        summary = verify(args.path)
        print(f"ok: {args.path}: {summary['tensors']} tensors, {summary['files']} files, "
              f"{summary['upstream_tensors']} upstream tensors accounted for")
    elif args.command == "recipes":
        from requant.formats.table import UNQUANTIZED
        from requant.recipe import builtin_names, load_recipe

        recipes = [load_recipe(n) for n in builtin_names()]
        if args.json:
            print(json.dumps([{"name": r.name, "format": r.format, "targets": dict(r.targets),
                               "overrides": [list(o) for o in r.overrides]} for r in recipes], indent=2))
        for r in recipes if not args.json else []:
            quantized = [c if t == r.format else f"{c} ({t})" for c, t in r.targets if t != UNQUANTIZED]
            print(f"{r.name:28s} {r.format:16s} quantizes: {', '.join(quantized) or 'nothing'}")
    elif args.command == "serve":
        from requant.serving.server import serve

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
              served_model_name=args.served_model_name, max_model_len=args.max_model_len,
              max_body_bytes=args.max_body_bytes, max_pending=args.max_pending, log_level=args.log_level,
              body_timeout_s=args.body_timeout, device=args.device)
    elif args.command == "engine-probe":
        return _engine_probe(args)
    elif args.command == "smoke":
        from requant.engines.engines import attach
        from requant.engines.smoke import dumps, format_result, load_limits, smoke_test, task_prompts

        key = api_key()
        engine = attach(args.base_url, args.model, key)
        reference = attach(args.reference_url, args.reference_model, key) if args.reference_url else None
        prompts = task_prompts(args.gsm8k_dir) if args.gsm8k_dir else None
        pair = (args.checkpoint, args.reference_checkpoint) if args.checkpoint and args.reference_checkpoint else None
        result = smoke_test(engine, reference, load_limits(args.limits), prompts, pair)
        print(format_result(result))
        if args.out:
            Path(args.out).write_text(dumps(result) + "\n")
        return 0 if result["passed"] else 1
    elif args.command == "localize":
        from requant.engines.localize import LocalizeLimits, format_localization, localize
        from requant.engines.smoke import PROMPTS, task_prompts

        texts = task_prompts(args.gsm8k_dir) if args.gsm8k_dir else PROMPTS
        limits = LocalizeLimits(max_bytes=int(args.max_gib * 2**30) if args.max_gib else 1 << 62)
        result = localize(args.checkpoint, args.reference, list(texts), limits)
        print(format_localization(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 1 if result.get("first_layer") is not None else 0
    elif args.command == "eval":
        from requant.engines.engines import attach
        from requant.evaluation.gsm8k import run_gsm8k

        key = api_key(openai_fallback=True)
        engine = attach(args.base_url, args.model, key)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        result = run_gsm8k(engine.base_url, engine.served_model_name, variant=args.variant or engine.served_model_name,
                           seeds=seeds, num_fewshot=args.num_fewshot, limit=args.limit, gsm8k_dir=args.gsm8k_dir,
                           out_dir=args.out, num_concurrent=args.num_concurrent, api_key=key)
        for name, per_seed in result.scores.items():
            values = ", ".join(f"{seed}: {100 * v:.2f}%" for seed, v in per_seed.items())
            print(f"gsm8k {name}: {values}")
        print(f"per-sample logs and gsm8k.json in {args.out}")
    elif args.command == "compare":
        from requant.evaluation.downstream import write_report
        from requant.evaluation.gsm8k import load_result

        smoke = json.loads(Path(args.smoke).read_text()) if args.smoke else None
        comparison, _ = write_report(load_result(args.candidate), load_result(args.reference), smoke, Path(args.out),
                                     args.gate)
        print((Path(args.out) / "report.md").read_text())
        return {"PASS": 0, "FAIL": 1}.get(comparison.verdict, 3)  # 3: INCONCLUSIVE
    elif args.command == "bench-serve":
        from requant.bench.serve import format_results, run_bench_serve
        from requant.evaluation.gsm8k import find_local_gsm8k

        gsm8k = args.gsm8k_dir or find_local_gsm8k()
        print(format_results(run_bench_serve(args.out, eval_items=args.eval_items, gsm8k_dir=gsm8k and str(gsm8k))))
    elif args.command == "bench" and args.peers:
        from requant.bench.peers import run_peers_bench

        run_peers_bench(args.experts, args.tmpfs, args.out, upstream=args.upstream)
    elif args.command == "bench" and args.hub:
        from requant.bench.hub import run_hub_bench

        run_hub_bench(args.experts, args.tmpfs, args.out)
    elif args.command == "bench" and args.layer:
        from requant.bench.layer import run_layer_bench

        run_layer_bench(args)
    elif args.command == "bench":
        from requant.bench.conversion import run_bench

        run_bench(args)
    return 0

