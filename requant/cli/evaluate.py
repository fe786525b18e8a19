"""``requant eval``: GSM8K through lm-eval against a running server's /v1/completions."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("eval", help="GSM8K through lm-eval against a running server's /v1/completions")
    p.add_argument("base_url")
    p.add_argument("--model", help="served model name (default: the first of /v1/models)")
    p.add_argument("--variant", help="name recorded in the result (default: the model name)")
    p.add_argument("--seeds", default="42,1234,7777", help="comma-separated; one lm-eval run per seed")
    p.add_argument("--num-fewshot", type=int, default=3)
    p.add_argument("--limit", type=int, help="items per seed (default: all 1319)")
    p.add_argument("--gsm8k-dir", help="directory with train.jsonl and test.jsonl, or requant:trained for the "
                   "trained model's own task (default: the hub's openai/gsm8k)")
    p.add_argument("--num-concurrent", type=int, default=1)
    p.add_argument("--out", default="gsm8k-eval", help="output directory (per-seed sample logs, gsm8k.json)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.api_key import api_key
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
    return 0
