"""make measure-trained: the trained model per variant, smoke test and GSM8K, the figures behind smoke.yaml's
bounds and the README's accuracy table.

Builds the INT4 upstream from requant/testing/trained/assets (`requant synth --profile trained`), converts it with every
built-in recipe, makes the deliberately damaged conversions of requant.testing.trained.damage.CATALOG, then serves each
variant with `requant serve` and runs what the evaluation flow runs: the smoke test against the reference
(fp8-reference; with localization when it fails), lm-eval's gsm8k task on the model's own task (3-shot, every
seed) and the gate's comparison. Unlike the flow, a variant that fails its smoke test is still scored, so the
table shows what it would have scored. Writes results.json (with date, versions and machine) and table (.md) under
--out and prints the table. --no-gsm8k measures the smoke test alone (a minute or two).

    python -m dev.measure_trained [--limit 100] [--seeds 42 1234 7777] [--out results/trained] [--no-gsm8k]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import requant
from requant.bench.provenance import CONVERSION, SERVING, describe, run_info
from requant.engines.engines import launch, load_engines
from requant.engines.smoke import load_limits
from requant.evaluation.gsm8k import TRAINED_TASK, check_gsm8k_dir
from requant.evaluation.judge import Judgement, Protocol, evaluate_reference, serve_and_judge
from requant.recipe import builtins_in
from requant.testing.synth import synthesize
from requant.testing.trained.damage import CATALOG, damage, unseen_rows

# The code these figures measure: the model and its damage, every conversion, the servers, the smoke test and
# GSM8K with the gate's comparison.
MEASURES = (*CONVERSION, *SERVING, "dev/measure_trained.py", "requant/testing/trained", "requant/engines/smoke.py",
            "requant/engines/smoke.yaml", "requant/engines/localize.py", "requant/evaluation")
REFERENCE = "fp8-reference"
# the built-in recipes whose files name the trained lane (`lanes:`, default all), the reference first
RECIPES = tuple(r for r in builtins_in("trained") if r != REFERENCE)


def build(root: Path) -> dict[str, Path]:
    """The upstream and every recipe's conversion, by variant name."""
    upstream = root / "int4-upstream"
    if not (upstream / "config.json").exists():
        synthesize(upstream, "trained", seed=0, progress=False)
    paths = {"int4-upstream": upstream}
    for recipe in (REFERENCE, *RECIPES):
        paths[recipe] = root / recipe
        if not (paths[recipe] / "requant-manifest.json").exists():
            requant.convert(str(upstream), str(paths[recipe]), recipe, progress=False)
    return paths


def eval_answers(limit: int | None) -> list[str]:
    """The gold answers of the test items GSM8K asks: the text the model has to write, where zeroed embedding
    rows hurt most (rows chosen by the questions alone hit names, which the arithmetic does not need)."""
    test = check_gsm8k_dir(TRAINED_TASK)["test"]
    return [json.loads(line)["answer"] for line in test.read_text().splitlines() if line.strip()][:limit]


def build_damaged(paths: dict[str, Path], root: Path, smoke_texts: list[str], limit: int | None) -> dict[str, Any]:
    """Every damaged variant of the catalog; embed-rows-zeroed's rows are the span no smoke text uses."""
    rows = unseen_rows(paths["int4-upstream"], smoke_texts, eval_answers(limit))
    made = {}
    for d in CATALOG:
        path = root / f"damaged-{d.name}"
        if not path.exists():
            damage(paths[d.base], path, d.kind, experts=list(d.experts) if d.experts else None,
                   rows=rows if d.kind == "embed-rows-zeroed" else None)
        made[f"damaged:{d.name}"] = path
    return {"paths": made, "embed_rows": list(rows)}


def _row(j: Judgement) -> dict[str, Any]:
    numeric, seq = j.smoke["numeric"], j.smoke["numeric"]["sequence"]
    loc = numeric.get("localization")
    row = {"smoke_passed": j.smoke["passed"], "failed_checks": [c["name"] for c in j.smoke["checks"] if not c["passed"]],
           "next_token": {"top1": numeric["top1_agreement"], "mean_kl": numeric["mean_kl"]},
           "sequence": {k: seq.get(k) for k in ("positions", "confident_positions", "top1_agreement", "mean_kl",
                                               "max_prompt_kl", "exact_match")},
           "coverage_min_tokens": numeric["coverage"].get("min_tokens"),
           "localization": loc.get("summary") if loc else None, "smoke_seconds": round(j.smoke_seconds, 1)}
    if j.comparison is not None:
        row["verdict"] = j.comparison.verdict
        row["gsm8k_seconds"] = round(j.gsm8k_seconds, 1)
        row["filters"] = {fc.filter: {"candidate": fc.candidate.mean, "candidate_sd": fc.candidate.stdev,
                                      "reference": fc.reference.mean, "delta": fc.delta,
                                      "items_differing": fc.permutation.n_differing,
                                      "items_p": fc.permutation.p_value,
                                      "mcnemar_b": fc.mcnemar.b, "mcnemar_c": fc.mcnemar.c,
                                      "mcnemar_p": fc.mcnemar.p_exact, "bootstrap_ci": [fc.bootstrap.ci_low,
                                                                                       fc.bootstrap.ci_high],
                                      "mde": fc.mde} for fc in j.comparison.filters}
    return row


def measure(paths: dict[str, Path], root: Path, protocol: Protocol, gsm8k: bool,
            measures: tuple[str, ...] = MEASURES) -> dict[str, Any]:
    spec = load_engines()["reference"]
    limits = load_limits()
    rows: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    with launch(spec, str(paths[REFERENCE]), served_model_name=REFERENCE, log_dir=root / "logs",
                max_model_len=4096) as ref:
        started = time.perf_counter()
        reference = evaluate_reference(ref, protocol, root / "eval" / REFERENCE) if gsm8k else None
        ref_seconds = time.perf_counter() - started
        queue = list(paths.items())
        while queue:
            name, path = queue.pop(0)
            if name == REFERENCE:
                continue
            served = name.replace(":", "-")
            j = serve_and_judge(path, served, ref, paths[REFERENCE], reference, protocol, root / "eval" / served,
                                root / "logs", score_after_failed_smoke=True)
            rows[name] = _row(j)
            print(f"{name}: smoke {'pass' if j.smoke['passed'] else 'FAIL'}"
                  + (f", {j.comparison.verdict}" if j.comparison else ""), flush=True)
            if name == "int4-upstream":                    # the reference's continuations: the smoke texts
                extra = build_damaged(paths, root / "checkpoints", j.smoke["numeric"]["sequence"]["texts"],
                                      protocol.limit)
                queue += list(extra["paths"].items())
    return {"info": run_info(measures=measures), "reference": REFERENCE, "seeds": list(protocol.seeds), "limit": protocol.limit,
            "gsm8k": gsm8k, "reference_gsm8k_seconds": round(ref_seconds, 1) if gsm8k else None,
            "n_items": len(reference.doc_ids) if reference else None,
            "reference_scores": ({k: sum(v.values()) / len(v) for k, v in reference.scores.items()}
                                 if reference else None),
            "embed_rows": extra.get("embed_rows"), "limits": asdict(limits),
            "variants": rows}


def _items_cell(fx: dict[str, Any], seeds: int) -> str:
    """The gate's item test: items that differ, p. Files from before it was recorded hold McNemar's pooled pairs,
    which under one seed are the same test (b + c items, the same exact p); under more they are left out."""
    if "items_p" in fx:
        return f"{fx['items_differing']}, {fx['items_p']:.2g}"
    return f"{fx['mcnemar_b'] + fx['mcnemar_c']}, {fx['mcnemar_p']:.2g}" if seeds == 1 else "not recorded"


def table(results: dict[str, Any]) -> str:
    lines = [f"Measured {describe(results['info'])}.", ""]
    if results["gsm8k"]:
        ref = results["reference_scores"]
        lines += [f"GSM8K: {results['n_items']} test items x {len(results['seeds'])} seeds (3-shot, lm-eval gsm8k "
                  f"through `requant serve`); reference {results['reference']}: flexible-extract "
                  f"{100 * ref['flexible-extract']:.1f}%, strict-match {100 * ref['strict-match']:.1f}%, "
                  f"{results['reference_gsm8k_seconds']:.0f} s.", ""]
    lines += ["Smoke test against the reference (next token: top-1, KL; sequence: top-1 at confident positions, mean "
              "KL, worst prompt KL, greedy continuations equal), then GSM8K flexible-extract.", "",
              "| variant | smoke | next token | sequence | coverage (min tokens/expert) | localization | smoke s "
              "| GSM8K % (Δ pp) | items differing, p (the gate's test) | GSM8K s | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["variants"].items():
        nt, sq = row["next_token"], row["sequence"]
        top1 = "n/a" if sq["top1_agreement"] is None else f"{sq['top1_agreement']:.3f}"
        cells = [name, "pass" if row["smoke_passed"] else "**fail**", f"{nt['top1']:.2f}, {nt['mean_kl']:.4f}",
                 f"{top1}, {sq['mean_kl']:.4f}, {sq['max_prompt_kl']:.4f}, {sq['exact_match']:.2f}",
                 str(row["coverage_min_tokens"]), row["localization"] or "", f"{row['smoke_seconds']:.1f}"]
        if "filters" in row:
            fx = row["filters"]["flexible-extract"]
            verdict = row["verdict"] if row["smoke_passed"] else f"stopped at smoke (gate alone: {row['verdict']})"
            cells += [f"{100 * fx['candidate']:.1f} ({100 * fx['delta']:+.1f})",
                      _items_cell(fx, len(results["seeds"])), f"{row['gsm8k_seconds']:.0f}",
                      verdict]
        else:
            cells += ["", "", "", "stopped at smoke" if not row["smoke_passed"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if results["embed_rows"]:
        lines += ["", f"embed-rows-zeroed zeroes token rows {results['embed_rows'][0]}-{results['embed_rows'][1] - 1}: "
                  "the span no smoke-test text uses that the most GSM8K items do."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/trained"), help="results.json and table (committed)")
    p.add_argument("--work", type=Path, default=Path("measurements/trained"), help="checkpoints, logs, samples")
    p.add_argument("--limit", type=int, default=100, help="test items per seed (0 = all 1319)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1234, 7777])
    p.add_argument("--no-gsm8k", action="store_true", help="the smoke test only")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = build(args.work / "checkpoints")
    protocol = Protocol(TRAINED_TASK, tuple(args.seeds), args.limit or None)
    results = measure(paths, args.work, protocol, not args.no_gsm8k)
    name = "results" if not args.no_gsm8k else "smoke"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
