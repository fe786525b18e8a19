"""The ``requant`` command line. Errors a user can fix print as one line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

from requant.errors import PlanError, RequantError, VerifyError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="requant", description="Re-quantize Kimi-K2.6-family MoE checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic upstream checkpoint with Kimi-K2.6's layout")
    s.add_argument("dst")
    s.add_argument("--profile", default="tiny", choices=["tiny", "k26-topology"])
    s.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("convert", help="convert an upstream checkpoint with a recipe")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--recipe", required=True, help="built-in recipe name or path to a recipe YAML")
    c.add_argument("--local", action="store_true",
                   help="run every layer job in this process (default: the Prefect flow on Ray; SRC/DST may be s3://)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--device", default="cpu", help="torch device for the kernels (cpu, cuda, cuda:1, ...)")
    c.add_argument("--threads", type=int, default=1, help="row threads per expert matrix (torch itself then uses 1)")
    c.add_argument("--upstream-id", help="upstream model id recorded in the manifest (default: directory name)")
    c.add_argument("--revision", help="upstream revision recorded in the manifest")

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

    sv = sub.add_parser("serve", help="OpenAI-compatible reference server for a checkpoint (dir or s3://)")
    sv.add_argument("checkpoint")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=os.environ.get("REQUANT_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $REQUANT_API_KEY; prefer the variable, "
                         "command lines are visible to other users)")
    sv.add_argument("--served-model-name", help="model name clients send (default: the checkpoint's last path part)")
    sv.add_argument("--max-model-len", type=int, default=8192, help="prompt + completion tokens per request")
    sv.add_argument("--max-pending", type=int, default=16, help="requests in flight before 429")
    sv.add_argument("--max-body-bytes", type=int, default=4 << 20)
    sv.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    sv.add_argument("--log-level", default="warning")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (PlanError, VerifyError) as exc:
        print(f"requant {args.command}: error: {exc}", file=sys.stderr)
        for problem in exc.problems[1:]:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except RequantError as exc:
        print(f"requant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"requant {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "synth":
        from requant.synth import synthesize

        print(synthesize(args.dst, args.profile, args.seed))
    elif args.command == "convert":
        if not args.local:
            from flows.requantize import requantize

            summary = requantize(upstream=args.src, output=args.dst, recipe=args.recipe, revision=args.revision,
                                 upstream_id=args.upstream_id, device=args.device, threads=args.threads)
            print(f"wrote {args.dst}: {summary['tensors']} tensors, {summary['jobs']} layer jobs ({summary['skipped']} resumed)")
            return 0
        from requant.convert import convert_local

        if args.threads > 1:
            import torch

            torch.set_num_threads(1)
        manifest = convert_local(args.src, args.dst, args.recipe, overwrite=args.overwrite, device=args.device,
                                 upstream_id=args.upstream_id, revision=args.revision, threads=args.threads)
        for warning in manifest["recipe"]["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"wrote {args.dst}: {len(manifest['tensors'])} tensors in {sum(1 for f in manifest['outputs'] if f.endswith('.safetensors'))} shards")
    elif args.command == "verify":
        from requant.verify import verify

        summary = verify(args.path)
        print(f"ok: {args.path}: {summary['tensors']} tensors, {summary['files']} files, "
              f"{summary['upstream_tensors']} upstream tensors accounted for")
    elif args.command == "recipes":
        from requant.recipe import builtin_names, load_recipe

        recipes = [load_recipe(n) for n in builtin_names()]
        if args.json:
            print(json.dumps([{"name": r.name, "format": r.format, "targets": dict(r.targets)} for r in recipes], indent=2))
        for r in recipes if not args.json else []:
            quantized = [c for c, t in r.targets if t != "unquantized"]
            print(f"{r.name:18s} {r.format:16s} quantizes: {', '.join(quantized) or 'nothing'}")
    elif args.command == "serve":
        from requant.serving.server import serve

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
              served_model_name=args.served_model_name, max_model_len=args.max_model_len,
              max_body_bytes=args.max_body_bytes, max_pending=args.max_pending, log_level=args.log_level)
    elif args.command == "bench":
        from requant.bench import run_bench

        run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
