"""make measure-trained: the trained model's accuracy per variant, the numbers in the README.

Builds the INT4 upstream from requant/trained/assets (`requant synth --profile trained`), converts it with every
built-in recipe, makes the deliberately damaged conversions (requant.trained.damage), then serves each variant
with `requant serve` and runs what the evaluation flow runs: the smoke test against the reference
(fp8-reference), lm-eval's gsm8k task on the model's own task (3-shot, every seed) and the gate's comparison.
Unlike the flow, a variant that fails its smoke test is still scored, so the table shows what it would have
scored. Writes results.json and table.md under --out and prints the table.

    python -m dev.measure_trained [--limit 100] [--seeds 42 1234 7777] [--out measurements/trained]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from requant.convert import convert_local
from requant.engines.engines import launch, load_engines
from requant.engines.smoke import load_limits, smoke_test, task_prompts
from requant.evaluation.compare import compare
from requant.evaluation.gsm8k import TRAINED_TASK, run_gsm8k
from requant.synth import synthesize
from requant.trained.damage import DAMAGES, damage

REFERENCE = "fp8-reference"
RECIPES = ("bf16-staging", "kimi-k2.6-mxfp4", "amd-kimi-mxfp4", "amd-kimi-k25-mxfp4", "amd-kimi-k25-mxfp4-attn-fp8")
DAMAGED_FROM = "kimi-k2.6-mxfp4"


def build(root: Path) -> dict[str, Path]:
    """The upstream, every recipe's conversion and the damaged conversions, by variant name."""
    upstream = root / "int4-upstream"
    if not (upstream / "config.json").exists():
        synthesize(upstream, "trained", seed=0, progress=False)
    paths = {"int4-upstream": upstream}
    for recipe in (REFERENCE, *RECIPES):
        paths[recipe] = root / recipe
        if not (paths[recipe] / "requant-manifest.json").exists():
            convert_local(str(upstream), str(paths[recipe]), recipe, progress=False)
    for kind in DAMAGES:
        name = f"damaged:{kind}"
        paths[name] = root / f"damaged-{kind}"
        if not paths[name].exists():
            damage(paths[DAMAGED_FROM], paths[name], kind)
    return paths


def measure(paths: dict[str, Path], root: Path, seeds: list[int], limit: int | None) -> dict[str, Any]:
    spec = load_engines()["reference"]
    limits, prompts = load_limits(), task_prompts(TRAINED_TASK)  # the agreement prompts the flow uses here
    rows: dict[str, Any] = {}
    with launch(spec, str(paths[REFERENCE]), served_model_name=REFERENCE, log_dir=root / "logs",
                max_model_len=4096) as ref:
        reference = run_gsm8k(ref.base_url, REFERENCE, variant=REFERENCE, seeds=seeds, limit=limit,
                              gsm8k_dir=TRAINED_TASK, out_dir=root / "eval" / REFERENCE)
        for name, path in paths.items():
            if name == REFERENCE:
                continue
            started = time.perf_counter()
            with launch(spec, str(path), served_model_name=name.replace(":", "-"), log_dir=root / "logs",
                        max_model_len=4096) as cand:
                smoke = smoke_test(cand, ref, limits, prompts)
                result = run_gsm8k(cand.base_url, cand.served_model_name, variant=name, seeds=seeds, limit=limit,
                                   gsm8k_dir=TRAINED_TASK, out_dir=root / "eval" / name.replace(":", "-"))
            c = compare(result, reference)
            rows[name] = {"smoke_passed": smoke["passed"], "top1_agreement": smoke["numeric"]["top1_agreement"],
                          "mean_kl": smoke["numeric"]["mean_kl"], "verdict": c.verdict,
                          "seconds": round(time.perf_counter() - started, 1),
                          "filters": {fc.filter: {"candidate": fc.candidate.mean, "candidate_sd": fc.candidate.stdev,
                                                  "reference": fc.reference.mean, "delta": fc.delta,
                                                  "mcnemar_b": fc.mcnemar.b, "mcnemar_c": fc.mcnemar.c,
                                                  "mcnemar_p": fc.mcnemar.p_exact, "bootstrap_p": fc.bootstrap.p_value,
                                                  "bootstrap_ci": [fc.bootstrap.ci_low, fc.bootstrap.ci_high],
                                                  "mde": fc.mde}
                                      for fc in c.filters}}
            print(f"{name}: {rows[name]['verdict']}, flexible-extract "
                  f"{100 * rows[name]['filters']['flexible-extract']['candidate']:.1f}%", flush=True)
    return {"reference": REFERENCE, "seeds": seeds, "limit": limit, "n_items": len(reference.doc_ids),
            "reference_scores": {k: sum(v.values()) / len(v) for k, v in reference.scores.items()}, "variants": rows}


def table(results: dict[str, Any]) -> str:
    ref = results["reference_scores"]
    lines = [f"{results['n_items']} test items x {len(results['seeds'])} seeds (3-shot, lm-eval gsm8k through "
             f"`requant serve`); reference {results['reference']}: flexible-extract {100 * ref['flexible-extract']:.1f}%, "
             f"strict-match {100 * ref['strict-match']:.1f}%.", "",
             "| variant | flexible-extract % (sd) | strict-match % | Δ pp vs FP8 | McNemar b/c, p | bootstrap 95% CI pp "
             "| MDE pp | smoke (top-1, KL) | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["variants"].items():
        fx, sm = row["filters"]["flexible-extract"], row["filters"]["strict-match"]
        lo, hi = fx["bootstrap_ci"]
        smoke = f"{'pass' if row['smoke_passed'] else '**fail**'} ({row['top1_agreement']:.2f}, {row['mean_kl']:.3f})"
        verdict = row["verdict"] if row["smoke_passed"] else f"{row['verdict']} (stopped at smoke)"
        lines.append(f"| {name} | {100 * fx['candidate']:.1f} ({100 * fx['candidate_sd']:.1f}) | {100 * sm['candidate']:.1f} "
                     f"| {100 * fx['delta']:+.1f} | {fx['mcnemar_b']}/{fx['mcnemar_c']}, {fx['mcnemar_p']:.2g} "
                     f"| [{100 * lo:+.1f}, {100 * hi:+.1f}] | {100 * fx['mde']:.1f} | {smoke} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("measurements/trained"))
    p.add_argument("--limit", type=int, default=100, help="test items per seed (0 = all 1319)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1234, 7777])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = build(args.out / "checkpoints")
    results = measure(paths, args.out, args.seeds, args.limit or None)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
