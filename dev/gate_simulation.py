"""make gate-simulation: how often the GSM8K gate FAILs an honest conversion, pooled McNemar against the item test.

1. Outcomes (skipped when --outcomes names a file already measured): the trained model's fp8-reference and its
   honest kimi-k2.6-mxfp4 conversion, each served with `requant serve` and scored with lm-eval's gsm8k task on the
   model's own task, --limit items under each of --seeds (more seeds than an evaluation uses, so draws can pick
   seeds too). Written to results/gate-simulation/outcomes.json (0/1 per seed and item, strict-match).
2. Simulation (requant.evaluation.simulate) at 50, 100 and 1319 items x 3 seeds, on those outcomes and on a
   synthetic GSM8K-like pool (items mostly answered alike under every seed, about 70% accuracy) for contrast; the
   pair as measured only at sizes up to its own number of items.
   Writes results/gate-simulation.json and .md.

    python -m dev.gate_simulation [--limit 120] [--seeds 42 1234 7777 1 2] [--draws 2000] [--outcomes FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from requant.bench.provenance import describe, run_info, write_results
from requant.evaluation.simulate import MODES, gsm8k_like_pool, pool_summary, simulate

CANDIDATE, REFERENCE = "kimi-k2.6-mxfp4", "fp8-reference"
FILTER = "strict-match"
SIZES = (50, 100, 1319)
MEASURES = ("requant/evaluation/stats.py", "requant/evaluation/simulate.py", "requant/evaluation/compare.py",
            "requant/evaluation/gate.yaml", "dev/gate_simulation.py")


def measure_outcomes(work: Path, seeds: list[int], limit: int) -> dict:
    """Serve both variants and score them on the trained task; per-variant [seed][item] outcomes."""
    from dev.measure_trained import build
    from requant.engines.engines import launch, load_engines
    from requant.evaluation.gsm8k import TRAINED_TASK, run_gsm8k

    paths = build(work / "checkpoints")
    outcomes = {}
    for name in (REFERENCE, CANDIDATE):
        with launch(load_engines()["reference"], str(paths[name]), served_model_name=name, log_dir=work / "logs",
                    max_model_len=4096) as server:
            result = run_gsm8k(server.base_url, name, variant=name, seeds=seeds, num_fewshot=3, limit=limit,
                               gsm8k_dir=TRAINED_TASK, out_dir=work / "eval" / name, progress=True)
        outcomes[name] = {"doc_ids": result.doc_ids,
                          "items": {f: [result.items[f][str(s)] for s in seeds] for f in result.items}}
    return {"info": run_info(), "seeds": seeds, "limit": limit, "task": "requant:trained (3-shot)",
            "variants": outcomes}


def _grid(outcomes: dict, name: str) -> np.ndarray:
    return np.asarray(outcomes["variants"][name]["items"][FILTER], dtype=np.int64)


def run(outcomes: dict, draws: int) -> dict:
    pools = {"trained model, honest kimi-k2.6-mxfp4 vs fp8-reference": (_grid(outcomes, CANDIDATE),
                                                                          _grid(outcomes, REFERENCE)),
             "synthetic GSM8K-like pair of equal quality": gsm8k_like_pool(np.random.default_rng(5), 1319, 5)}
    rows = []
    for pool, (cand, ref) in pools.items():
        for mode in MODES:
            # The pair as measured is only as informative as its own items: resampled beyond them, each item would
            # stand for several and a difference on a few items would look certain.
            for n in (SIZES if mode == "exchangeable" else [n for n in SIZES if n <= cand.shape[1]]):
                rates = simulate(cand, ref, mode=mode, n_items=n, n_seeds=3, draws=draws, seed=n)
                rows.append({"pool": pool, **asdict(rates)})
                print(f"{pool}, {mode}, {n} x 3: {rates.rejects} {rates.gate_fails}", flush=True)
    return {"info": run_info(measures=MEASURES), "outcomes_measured": outcomes["info"], "draws": draws,
            "alpha": 0.05, "max_drop_pp": 1.0, "filter": FILTER,
            "pools": {pool: pool_summary(*pair) for pool, pair in pools.items()}, "rows": rows}


def table(results: dict) -> str:
    lines = [f"Simulated {describe(results['info'])}; trained outcomes measured {describe(results['outcomes_measured'])}.",
             "", f"{results['draws']} draws per row, alpha {results['alpha']}, gate max drop "
             f"{results['max_drop_pp']} pp, {results['filter']}. 'rejects': p < alpha in either direction; "
             "'gate FAILs': a drop beyond the allowed one and p < alpha.", "",
             "| pool | null | items x seeds | items test rejects | pooled McNemar rejects | gate FAILs (items) "
             "| gate FAILs (pooled) | MDE pp (items, 80%) |", "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['pool']} | {row['mode']} | {row['n_items']} x {row['n_seeds']} "
                     f"| {row['rejects']['permutation']:.3f} | {row['rejects']['mcnemar']:.3f} "
                     f"| {row['gate_fails']['permutation']:.3f} | {row['gate_fails']['mcnemar']:.3f} "
                     f"| {100 * row['mde']:.1f} |")
    lines += ["", "| pool | seeds x items | accuracy cand / ref | items alike across seeds (cand / ref) "
              "| items differing | pooled discordant pairs |", "|---|---|---|---|---|---|"]
    for pool, s in results["pools"].items():
        lines.append(f"| {pool} | {s['seeds']} x {s['items']} | {100 * s['candidate_accuracy']:.1f} / "
                     f"{100 * s['reference_accuracy']:.1f} | {s['candidate_items_alike_across_seeds']:.2f} / "
                     f"{s['reference_items_alike_across_seeds']:.2f} | {s['items_differing']} "
                     f"| {s['pooled_discordant_pairs']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--work", type=Path, default=Path("measurements/gate-simulation"))
    p.add_argument("--outcomes", type=Path, default=Path("results/gate-simulation/outcomes.json"),
                   help="measured outcomes: read when present, else measured and written here")
    p.add_argument("--limit", type=int, default=120, help="trained-task test items per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1234, 7777, 1, 2])
    p.add_argument("--draws", type=int, default=2000)
    args = p.parse_args(argv)
    if args.outcomes.exists():
        outcomes = json.loads(args.outcomes.read_text())
    else:
        outcomes = measure_outcomes(args.work, args.seeds, args.limit)
        args.outcomes.parent.mkdir(parents=True, exist_ok=True)
        args.outcomes.write_text(json.dumps(outcomes) + "\n")
    results = run(outcomes, args.draws)
    write_results(args.out, "gate-simulation", results, table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
