"""``requant bench conversion|layer|peers|hub|release|serve|cluster``: the library's benchmarks, one subcommand each.

Each subcommand owns its options, so none of them is a mode flag of another; the subcommand names the module of
``requant.bench`` that measures it. The benchmarks that need the flow (S3 + Ray) are ``python -m dev.bench``.
"""

from __future__ import annotations

import argparse
import json

SUBCOMMANDS = ("conversion", "layer", "peers", "hub", "release", "serve", "cluster")
# Benchmark modes that were flags or a command of their own, and what replaced them (for a one-line pointer).
RENAMED = {"bench-serve": "bench serve", "--layer": "bench layer", "--peers": "bench peers", "--hub": "bench hub"}


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="benchmarks: kernels and a whole checkpoint against Quark 0.11 "
                                          "(conversion), one K2.6 layer, the peers raced, reading from a Hub, serving")
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")

    c = sub.add_parser("conversion", help="kernel and whole-checkpoint benchmarks against Quark 0.11 (make bench)")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument("--out", help="also write bench.json and bench.md into this directory")
    c.add_argument("--skip-checkpoint", action="store_true", help="kernel benchmarks only")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--upstream", help="existing k26-topology upstream to convert (default: synthesize one)")
    c.add_argument("--layers", type=int, default=9,
                   help="decoder layers of the synthesized k26-topology model (61 = all; Quark takes over an hour then)")
    c.set_defaults(run=run_conversion)

    la = sub.add_parser("layer", help="one K2.6 layer at real widths (synth k26-layer) on tmpfs and on disk, each "
                                      "against its roofline measured in the same run (make bench-layer adds S3 and "
                                      "the flow on Ray)")
    _experts(la)
    la.add_argument("--recipe", default="amd-kimi-mxfp4", help="recipe to convert with")
    _tmpfs(la)
    la.add_argument("--disk", default=".", help="a directory on disk ('' to skip)")
    _out(la, "layer")
    la.set_defaults(run=run_layer)

    pe = sub.add_parser("peers", help="requant against the tools that write each target's format, on synth "
                                      "k26-layer, each a whole process tree: Quark 0.11.2, Quark 0.13 (1 process and "
                                      "one worker per core) and llm-compressor 0.14's model_free_ptq for "
                                      "amd-kimi-mxfp4; llm-compressor for ct-mxfp4 and ct-nvfp4a16; Model Optimizer "
                                      "0.47 for modelopt-nvfp4: wall, peak RSS, outputs checked against each other")
    _experts(pe)
    from requant.bench.peers import TARGETS

    pe.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma-separated recipes to race (default: all of {', '.join(TARGETS)})")
    pe.add_argument("--tmpfs", default="/dev/shm", help="where the input and the outputs are written")
    pe.add_argument("--upstream", help="an existing upstream to convert (default: synthesize k26-layer)")
    _out(pe, "peers")
    pe.set_defaults(run=run_peers)

    hu = sub.add_parser("hub", help="k26-layer read from requant's local Hub: layer jobs from hf:// against a plain "
                                    "download of the same bytes")
    _experts(hu)
    hu.add_argument("--tmpfs", default="/dev/shm", help="where the Hub, the input and the outputs are written")
    _out(hu, "hub")
    hu.set_defaults(run=run_hub)

    re = sub.add_parser("release", help="k26-layer released from S3 to requant's local Hub against a plain upload of "
                                        "the same files: MB/s, peak RSS, local disk written")
    _experts(re, default=48)
    re.add_argument("--tmpfs", default="/dev/shm", help="where S3, the Hub and the checkpoint keep their bytes")
    _out(re, "release")
    re.set_defaults(run=run_release)

    sv = sub.add_parser("serve", help="reference-server tokens/s per variant and lm-eval time per 100 items")
    _out(sv, "serve")
    sv.add_argument("--eval-items", type=int, default=20, help="GSM8K items for the lm-eval timing (0 = skip)")
    sv.add_argument("--gsm8k-dir", help="offline GSM8K for the lm-eval timing (default: $REQUANT_GSM8K_DIR or "
                                        "shared/data/gsm8k)")
    sv.set_defaults(run=run_serve)

    cl = sub.add_parser("cluster", help="Kimi-K2.6's real plan (synth k26 --layout-only) on 8 to 512 workers, its "
                                        "MoE layer jobs whole and split into expert groups, simulated at the "
                                        "per-worker rate make bench-layer measured")
    cl.add_argument("--layer-results", default="results/layer.json",
                    help="make bench-layer's results: the MoE layer job's rates on 1 thread and every core, and the "
                         "peak memory")
    _out(cl, "cluster")
    cl.set_defaults(run=run_cluster)


def _experts(p: argparse.ArgumentParser, default: int = 96) -> None:
    p.add_argument("--experts", type=int, default=default, help="routed experts (384 = a whole K2.6 layer, 10.8 GB)")


def _tmpfs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs directory ('' to skip)")


def _out(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--out", help=f"write {name}.json and {name}.md into this directory")


def renamed(argv: list[str]) -> str | None:
    """The replacement of a benchmark named the old way (``bench-serve``, ``bench --layer``, ``bench --out DIR``), or
    None."""
    if argv[:1] == ["bench-serve"]:
        return RENAMED["bench-serve"]
    if argv[:1] != ["bench"] or len(argv) < 2 or argv[1] in (*SUBCOMMANDS, "-h", "--help"):
        return None
    # the other options of the old plain ``requant bench`` are the conversion benchmark's
    return next((RENAMED[a] for a in argv[1:] if a in RENAMED), "bench conversion" if argv[1][:1] == "-" else None)


def run_conversion(args: argparse.Namespace) -> int:
    from requant.bench.conversion import render, run_bench

    results = run_bench(args.out, repeats=args.repeats, upstream=args.upstream, layers=args.layers,
                        skip_checkpoint=args.skip_checkpoint)
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


def run_layer(args: argparse.Namespace) -> int:
    from requant.bench.layer import run_layer_bench

    run_layer_bench(args.experts, recipe=args.recipe, tmpfs=args.tmpfs, disk=args.disk, out=args.out)
    return 0


def run_peers(args: argparse.Namespace) -> int:
    from requant.bench.peers import run_peers_bench

    run_peers_bench(args.experts, args.tmpfs, args.out, upstream=args.upstream,
                    targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    return 0


def run_hub(args: argparse.Namespace) -> int:
    from requant.bench.hub import run_hub_bench

    run_hub_bench(args.experts, args.tmpfs, args.out)
    return 0


def run_release(args: argparse.Namespace) -> int:
    from requant.bench.release import run_release_bench

    run_release_bench(args.experts, args.tmpfs, args.out)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from requant.bench.serve import format_results, run_bench_serve
    from requant.evaluation.gsm8k import find_local_gsm8k

    gsm8k = args.gsm8k_dir or find_local_gsm8k()
    print(format_results(run_bench_serve(args.out, eval_items=args.eval_items, gsm8k_dir=gsm8k and str(gsm8k))))
    return 0


def run_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from requant.bench.cluster import render, run_cluster_bench
    from requant.estimate import measured_from_layer_results

    print(render(run_cluster_bench(measured_from_layer_results(Path(args.layer_results)), out=args.out)))
    return 0
