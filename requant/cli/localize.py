"""``requant localize``: which layer and experts of a checkpoint depart from a reference (exit 1 when flagged)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("localize", help="which layer and experts of a checkpoint depart from a reference "
                            "(both loaded here; exit 1 when a part is flagged)")
    p.add_argument("checkpoint", help="the candidate checkpoint (a directory or s3:// URI)")
    p.add_argument("reference", help="the reference checkpoint")
    p.add_argument("--gsm8k-dir", help="run this task's test questions (a directory or requant:trained) instead "
                   "of the smoke test's built-in prompts")
    p.add_argument("--max-gib", type=float, default=None, help="refuse above this many GiB of both checkpoints "
                   "(default: no limit here; the smoke test's is in smoke.yaml)")
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.engines.localize import LocalizeLimits, format_localization, localize
    from requant.engines.smoke import PROMPTS, task_prompts

    texts = task_prompts(args.gsm8k_dir) if args.gsm8k_dir else PROMPTS
    limits = LocalizeLimits(max_bytes=int(args.max_gib * 2**30) if args.max_gib else 1 << 62)
    result = localize(args.checkpoint, args.reference, list(texts), limits)
    print(format_localization(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result.get("first_layer") is not None else 0
