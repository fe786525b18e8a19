"""``requant smoke``: a running OpenAI-compatible server smoke-tested (exit 1 on failure)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("smoke", help="smoke-test a running OpenAI-compatible server (exit 1 on failure)")
    p.add_argument("base_url", help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="served model name (default: the first of /v1/models)")
    p.add_argument("--reference-url", help="a server with the reference variant, for the numeric agreement check")
    p.add_argument("--reference-model")
    p.add_argument("--limits", help="YAML overriding requant/engines/smoke.yaml")
    p.add_argument("--gsm8k-dir", help="compare on this task's test questions (a directory or requant:trained) "
                   "instead of the built-in prompts")
    p.add_argument("--checkpoint", help="the checkpoint the server serves (a directory or s3:// URI): with "
                   "--reference-checkpoint, a failed agreement says which layer and experts differ")
    p.add_argument("--reference-checkpoint", help="the checkpoint the reference server serves")
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.api_key import api_key
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
