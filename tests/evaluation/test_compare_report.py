"""compare() and the gate on synthetic GSM8K results; the markdown, table, plot and model-card renderers."""

from __future__ import annotations

import json
from dataclasses import replace

import matplotlib.image
import numpy as np
import pytest
from scipy import stats as sps

from requant.errors import RequantError
from requant.evaluation import report, stats
from requant.evaluation.compare import compare, gate_schema, load_gate
from requant.evaluation.results import FILTERS, GSM8KResult
from requant.evaluation.stats import mcnemar

SEEDS = [42, 1234, 7777]


def result(variant: str, items: dict[str, dict[str, list[int]]], doc_ids: list[int], seeds=SEEDS) -> GSM8KResult:
    scores = {f: {s: float(np.mean(v)) for s, v in per_seed.items()} for f, per_seed in items.items()}
    return GSM8KResult(variant=variant, model=variant, base_url="http://127.0.0.1:8000/v1", num_fewshot=3,
                       limit=None, seeds=list(seeds), doc_ids=list(doc_ids), scores=scores, items=items)


def pair(n_items: int = 1319, ref_correct: int = 1240, worse: int = 0, better: int = 0, seed: int = 0,
         filters=FILTERS) -> tuple[GSM8KResult, GSM8KResult]:
    """Reference with exactly ``ref_correct`` right per seed; the candidate flips ``worse`` of those to wrong
    (discordant c) and ``better`` of the reference's misses to right (discordant b), per seed and filter."""
    rng = np.random.default_rng(seed)
    ref_items: dict[str, dict[str, list[int]]] = {}
    cand_items: dict[str, dict[str, list[int]]] = {}
    for f in filters:
        ref_items[f], cand_items[f] = {}, {}
        for s in SEEDS:
            ref = np.zeros(n_items, dtype=int)
            ref[rng.permutation(n_items)[:ref_correct]] = 1
            cand = ref.copy()
            cand[rng.permutation(np.flatnonzero(ref == 1))[:worse]] = 0
            cand[rng.permutation(np.flatnonzero(ref == 0))[:better]] = 1
            ref_items[f][str(s)], cand_items[f][str(s)] = ref.tolist(), cand.tolist()
    doc_ids = list(range(n_items))
    return result("kimi-k2.6-mxfp4", cand_items, doc_ids), result("fp8-reference", ref_items, doc_ids)


def write(tmp_path, text: str):
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- gate verdicts

def test_three_pp_worse_with_many_discordant_pairs_fails():
    cand, ref = pair(worse=80, better=40)  # -40/1319 = -3.03 pp per seed
    comparison = compare(cand, ref, load_gate(None), n_boot=2000)
    assert comparison.verdict == "FAIL" and not comparison.passed
    for fc in comparison.filters:
        assert fc.delta == pytest.approx(-40 / 1319)
        assert fc.paired_delta == pytest.approx(fc.delta)
        assert (fc.mcnemar.b, fc.mcnemar.c, fc.mcnemar.n) == (120, 240, 3 * 1319)
        assert fc.mcnemar.p_exact < 1e-9 and fc.failed
        assert fc.gate_p_value == fc.permutation.p_value < 1e-6
        assert fc.reason.startswith(f"{fc.filter}: FAIL") and "-3.03 pp" in fc.reason
        assert fc.bootstrap.ci_high < -0.01
    # The bootstrap and pooled McNemar gates agree.
    for test in ("bootstrap", "mcnemar"):
        assert compare(cand, ref, replace(load_gate(None), paired_test=test), n_boot=2000).verdict == "FAIL"


def test_seeds_that_repeat_an_item_are_not_new_evidence():
    """Six items lost and one gained under all three seeds (-2.5 pp): McNemar on pooled pairs sees 18 against 3
    (p = 0.0015) and would FAIL; over items it is 6 against 1, p = P(|2·Bin(7, ½) - 7| >= 5) = 16/128, a PASS."""
    n = 200
    ref_row = np.array([1] * 150 + [0] * 50)
    cand_row = ref_row.copy()
    cand_row[:6], cand_row[150] = 0, 1
    def same_under_every_seed(row):
        return {f: {str(s): row.tolist() for s in SEEDS} for f in FILTERS}

    cand = result("kimi-k2.6-mxfp4", same_under_every_seed(cand_row), range(n))
    ref = result("fp8-reference", same_under_every_seed(ref_row), range(n))
    comparison = compare(cand, ref, n_boot=500)
    fc = comparison.filter("strict-match")
    assert (fc.mcnemar.b, fc.mcnemar.c) == (3, 18) and fc.mcnemar.p_exact == pytest.approx(0.00149, abs=1e-5)
    assert fc.permutation.n_differing == 7 and fc.permutation.p_value == pytest.approx(16 / 128)
    assert comparison.verdict == "PASS" and "not significant" in fc.reason
    assert compare(cand, ref, replace(load_gate(None), paired_test="mcnemar"), n_boot=500).verdict == "FAIL"


def test_equal_passes():
    cand, ref = pair()
    identical = compare(cand, ref, n_boot=500)
    assert identical.verdict == "PASS"
    assert all(fc.mcnemar.p_exact == 1.0 and fc.delta == 0.0 for fc in identical.filters)
    # Same accuracy, different items right: many discordant pairs, no difference.
    cand, ref = pair(worse=50, better=50)
    swapped = compare(cand, ref, n_boot=500)
    assert swapped.verdict == "PASS"
    assert all(fc.mcnemar.b == fc.mcnemar.c == 150 and fc.mcnemar.p_exact == 1.0 for fc in swapped.filters)


def test_half_pp_worse_passes_even_when_significant():
    cand, ref = pair(worse=7)  # -0.53 pp; 21 pooled discordant pairs all one way: p = 2^-20
    comparison = compare(cand, ref, n_boot=500)
    assert comparison.verdict == "PASS"
    for fc in comparison.filters:
        assert fc.mcnemar.p_exact == pytest.approx(2 * 0.5**21) and fc.mcnemar.p_exact < 0.05
        assert "within the allowed 1 pp drop" in fc.reason and not fc.failed


def test_two_pp_worse_on_tiny_n_is_not_significant_and_passes():
    cand, ref = pair(n_items=50, ref_correct=45, worse=1)  # -2 pp; pooled b/c = 0/3: p = 0.25
    comparison = compare(cand, ref, n_boot=500)
    assert comparison.verdict == "PASS"
    for fc in comparison.filters:
        assert fc.delta == pytest.approx(-0.02)
        assert fc.mcnemar.p_exact == pytest.approx(0.25) == fc.gate_p_value  # three items: 2 of 8 sign vectors
        assert "not significant" in fc.reason


def test_gate_applies_only_to_its_filters(tmp_path):
    cand, ref = pair(worse=80, better=40)
    gate = load_gate(write(tmp_path, "filters: [strict-match]\nmax_drop_pp: 5\n"))
    assert (gate.filters, gate.max_drop_pp, gate.alpha, gate.paired_test) == (("strict-match",), 5.0, 0.05, "permutation")
    comparison = compare(cand, ref, gate, n_boot=500)
    assert comparison.verdict == "PASS"
    assert not comparison.filter("flexible-extract").gated
    assert "not gated" in comparison.filter("flexible-extract").reason


# ---------------------------------------------------------------- compare: numbers and matching

def test_compare_numbers_match_oracles():
    cand, ref = pair(worse=60, better=30, seed=3)
    # Means and Welch use lm-eval's per-seed scores as reported (here spread like the seed card's).
    cand_scores, ref_scores = [0.9310, 0.9401, 0.9355], [0.9348, 0.9447, 0.9393]
    cand = replace(cand, scores={f: dict(zip(map(str, SEEDS), cand_scores)) for f in FILTERS})
    ref = replace(ref, scores={f: dict(zip(map(str, SEEDS), ref_scores)) for f in FILTERS})
    comparison = compare(cand, ref, n_boot=500)
    fc = comparison.filter("strict-match")
    oracle = sps.ttest_ind(cand_scores, ref_scores, equal_var=False)
    assert fc.candidate.per_seed == tuple(cand_scores) and fc.reference.per_seed == tuple(ref_scores)
    assert fc.delta == pytest.approx(np.mean(cand_scores) - np.mean(ref_scores))
    assert fc.welch.t == pytest.approx(oracle.statistic, rel=1e-9)
    assert fc.welch.p_value == pytest.approx(oracle.pvalue, rel=1e-9)
    pooled_c = np.concatenate([cand.items["strict-match"][str(s)] for s in SEEDS])
    pooled_r = np.concatenate([ref.items["strict-match"][str(s)] for s in SEEDS])
    assert fc.mcnemar == mcnemar(pooled_c, pooled_r)
    grid = [np.array([x.items["strict-match"][str(s)] for s in SEEDS]) for x in (cand, ref)]
    assert fc.permutation == stats.item_permutation(*grid) and fc.gate_p_value == fc.permutation.p_value
    assert comparison.shared_seeds == tuple(SEEDS) and comparison.n_items == 1319 and comparison.notes == ()
    json.dumps(comparison.to_json(), allow_nan=False)


def test_compare_matches_items_by_doc_id_and_uses_shared_seeds_and_items():
    cand, ref = pair(n_items=200, ref_correct=180, worse=10, better=2)
    aligned = compare(cand, ref, n_boot=500)
    # The reference ran its items in reverse order: same pairs after matching by doc_id.
    reversed_ref = replace(ref, doc_ids=ref.doc_ids[::-1],
                           items={f: {s: v[::-1] for s, v in d.items()} for f, d in ref.items.items()})
    assert compare(cand, reversed_ref, n_boot=500).filters == aligned.filters
    # The reference ran one extra seed and 20 items the candidate did not: ignored by the paired tests.
    extra = {f: {**d, "99": d["42"]} for f, d in ref.items.items()}
    bigger = result("fp8-reference", {f: {s: v + [1] * 20 for s, v in d.items()} for f, d in extra.items()},
                    ref.doc_ids + list(range(1000, 1020)), seeds=SEEDS + [99])
    partial = compare(cand, bigger, n_boot=500)
    assert partial.shared_seeds == tuple(SEEDS) and partial.n_items == 200
    assert [fc.mcnemar for fc in partial.filters] == [fc.mcnemar for fc in aligned.filters]
    assert len(partial.notes) == 2 and "seeds differ" in partial.notes[0] and "items differ" in partial.notes[1]


def test_compare_rejects_results_that_share_nothing_or_are_malformed():
    cand, ref = pair(n_items=30, ref_correct=25)
    with pytest.raises(RequantError, match="share 0 seeds"):
        compare(cand, replace(ref, seeds=[1, 2, 3], scores={f: {"1": 0.9, "2": 0.9, "3": 0.9} for f in FILTERS},
                              items={f: {s: [1] * 30 for s in ("1", "2", "3")} for f in FILTERS}))
    with pytest.raises(RequantError, match="0 doc_ids"):
        compare(cand, replace(ref, doc_ids=list(range(100, 130))))
    short = replace(ref, items={f: {**d, "42": d["42"][:-1]} for f, d in ref.items.items()})
    with pytest.raises(RequantError, match=r"reference result 'fp8-reference'.*29 outcomes for 30 doc_ids"):
        compare(cand, short)
    with pytest.raises(RequantError, match="5-shot"):
        compare(cand, replace(ref, num_fewshot=5))
    only_flexible = pair(n_items=30, ref_correct=25, filters=("flexible-extract",))
    with pytest.raises(RequantError, match="needs filter.*strict-match"):
        compare(*only_flexible)


# ---------------------------------------------------------------- gate files

def test_builtin_gate_defaults_and_schema_filters():
    gate = load_gate(None)
    assert (gate.filters, gate.max_drop_pp, gate.alpha, gate.paired_test, gate.source) == (
        ("flexible-extract", "strict-match"), 1.0, 0.05, "permutation", "builtin")
    assert tuple(gate_schema()["properties"]["filters"]["items"]["enum"]) == FILTERS


@pytest.mark.parametrize("text,expected", [
    ("max_drop_pp: one\n", r"max_drop_pp: 'one' is not of type 'number'"),
    ("max_drop_pp: -1\n", r"max_drop_pp: -1 is less than the minimum of 0"),
    ("alpha: 1.5\n", r"alpha: 1.5 is greater than or equal to the maximum of 1"),
    ("paired_test: ttest\n", r"paired_test: 'ttest' is not one of \['permutation', 'bootstrap', 'mcnemar'\]"),
    ("filters: [exact]\n", r"filters/0: 'exact' is not one of"),
    ("filters: []\n", r"filters: \[\] should be non-empty"),
    ("max_drop: 2\n", r"\(top level\): Additional properties are not allowed \('max_drop' was unexpected\)"),
    ("- 1\n- 2\n", r"\(top level\): \[1, 2\] is not of type 'object'"),
    ("alpha: [0.05\n", r"not valid YAML at line 2"),
])
def test_gate_yaml_errors_are_clear(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RequantError, match=expected) as info:
        load_gate(path)
    message = str(info.value)
    assert message.startswith(f"gate {path}: ") and "\n" not in message


def test_gate_missing_file_and_empty_file(tmp_path):
    with pytest.raises(RequantError, match=r"gate .*nope.yaml: cannot read"):
        load_gate(tmp_path / "nope.yaml")
    assert load_gate(write(tmp_path, "")).max_drop_pp == 1.0


# ---------------------------------------------------------------- report

SMOKE = {"passed": False, "checks": [{"name": "chat completion", "passed": True, "detail": "200 OK in 1.2 s"},
                                     {"name": "tool call", "passed": False, "detail": "no tool_calls in reply"}]}


@pytest.fixture(scope="module")
def failing():
    return compare(*pair(worse=80, better=40), n_boot=500)


def test_markdown_has_verdict_numbers_and_smoke(failing):
    text = report.markdown(failing, SMOKE)
    assert text.startswith("# GSM8K: kimi-k2.6-mxfp4 vs fp8-reference: FAIL")
    assert "**Gate: FAIL.**" in text
    assert "| flexible-extract | -3.03 |" in text and "| strict-match | -3.03 |" in text
    assert "120 / 240" in text and "3-shot" in text and "42/1234/7777" in text
    ref = failing.filter("flexible-extract").reference
    assert f"{100 * ref.mean:.2f} ± {100 * ref.stdev:.2f}" in text
    for fc in failing.filters:
        assert fc.reason in text
    assert "Smoke test: FAILED" in text and "❌ tool call: no tool_calls in reply" in text
    assert "Smoke" not in report.markdown(failing)
    with pytest.raises(RequantError, match="smoke"):
        report.markdown(failing, {"checks": []})


def test_table_rows_are_flat_and_json_ready(failing):
    rows = report.table_rows(failing)
    assert [r["filter"] for r in rows] == list(FILTERS)
    for row in rows:
        assert all(isinstance(v, (str, float, int)) or v is None for v in row.values())
        assert row["delta_pp"] == pytest.approx(-100 * 40 / 1319) and row["gate"] == "FAIL"
        assert (row["mcnemar_b"], row["mcnemar_c"]) == (120, 240)
    json.dumps(rows, allow_nan=False)


def test_plot_writes_a_valid_png(failing, tmp_path):
    path = report.plot(failing, tmp_path / "out" / "gsm8k.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 400 <= height <= 1500 and 600 <= width <= 2000
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 20  # not a blank canvas


def test_quality_section_is_a_card_section_body(failing):
    """The body the model card (requant.card) puts under its ``## Quality`` heading: no heading of that level."""
    body = report.quality_section(failing, SMOKE, figure="eval/gsm8k.png")
    assert not any(line.startswith("## ") for line in body.splitlines())
    assert body.startswith("GSM8K against `fp8-reference`") and "![GSM8K accuracy per seed](eval/gsm8k.png)" in body
    assert "### Smoke test: FAILED" in body and "**Gate: FAIL.**" in body


# ---------------------------------------------------------------- floor and power

def test_a_reference_below_the_floor_is_inconclusive_never_pass(tmp_path):
    cand, ref = pair(n_items=200, ref_correct=0)                     # both score 0%: identical, and meaningless
    comparison = compare(cand, ref, n_boot=200)
    assert comparison.verdict == "INCONCLUSIVE" and not comparison.passed
    assert all(fc.inconclusive and "INCONCLUSIVE" in fc.reason and "below the 9% floor" in fc.reason
               for fc in comparison.filters)
    assert "INCONCLUSIVE" in report.markdown(comparison) and "verdict: INCONCLUSIVE" in report.format_table(comparison)
    cand, ref = pair(n_items=200, ref_correct=20)                    # 10%: above the floor
    assert compare(cand, ref, n_boot=200).verdict == "PASS"
    gate = load_gate(write(tmp_path, "min_reference_accuracy: 0.2\n"))
    assert compare(cand, ref, gate, n_boot=200).verdict == "INCONCLUSIVE"
    cand, ref = pair(n_items=200, ref_correct=12, worse=12)          # 6% -> 0%: below the floor, so not a FAIL
    assert compare(cand, ref, n_boot=200).verdict == "INCONCLUSIVE"
    gate = load_gate(write(tmp_path, "filters: [strict-match]\nmin_reference_accuracy: 0.0\n"))
    assert compare(cand, ref, gate, n_boot=200).verdict == "FAIL"  # a drop to 0 with no floor is a failure


@pytest.mark.parametrize("n_items,ref_correct,worse,better", [(1319, 1240, 50, 50), (200, 150, 0, 0), (100, 80, 5, 3)])
def test_the_detectable_drop_has_80_percent_power_by_simulation(n_items, ref_correct, worse, better):
    """The reported MDE against a Monte-Carlo of the gate's own test (the exact sign-flip test over items): items
    drawn from the observed per-item differences, their signs tilted so the mean is a drop of MDE (or, where the
    variants disagreed too little for that, whole items lost on a share of MDE of them), are rejected at alpha in
    about 80% of draws."""
    cand, ref = pair(n_items=n_items, ref_correct=ref_correct, worse=worse, better=better)
    comparison = compare(cand, ref, n_boot=200)
    fc = comparison.filter("strict-match")
    d, k = fc.mde, len(comparison.shared_seeds)
    assert 0 < d < 1 and "detectable drop" in report.markdown(comparison)
    seeds = np.arange(k)[:, None]
    totals = (np.array([cand.items["strict-match"][str(s)] for s in SEEDS])
              - np.array([ref.items["strict-match"][str(s)] for s in SEEDS])).sum(axis=0)
    magnitudes = np.abs(totals)
    q = float(np.mean((magnitudes / k) ** 2))
    rng = np.random.default_rng(1)
    draws, rejected = 2000, 0
    for _ in range(draws):
        if q >= d:                                                  # the observed spread, tilted to a drop of d
            m = rng.choice(magnitudes, n_items)
            negative = rng.random(n_items) < (1 + d / np.mean(m / k)) / 2
            m = np.where(negative, -m, m)
        else:                                                       # the floor: whole items lost, on d of them
            m = -k * (rng.random(n_items) < d).astype(int)
        c_grid, r_grid = (seeds < np.maximum(m, 0)).astype(int), (seeds < np.maximum(-m, 0)).astype(int)
        result = stats.item_permutation(c_grid, r_grid)
        rejected += result.p_value < 0.05 and result.delta < 0
    power = rejected / draws
    # Monte-Carlo noise at 2000 draws is about +-1.8 points (2 SE); the exact test is coarse at 100 items.
    tolerance = 0.04 if n_items >= 200 else 0.08
    assert abs(power - 0.80) <= tolerance, (power, d)
