"""requant.evaluation.stats against scipy as the oracle, hand computations and a published textbook example."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from requant.errors import RequantError
from requant.evaluation import stats
from requant.evaluation.simulate import gsm8k_like_pool
from requant.evaluation.stats import mcnemar, mean_std, paired_bootstrap, welch, welch_from_samples

# ---------------------------------------------------------------- mean_std

def test_mean_std_matches_statistics_module():
    values = [0.9355, 0.9401, 0.9310]
    mean, sd = mean_std(values)
    assert mean == pytest.approx(statistics.fmean(values), abs=1e-15)
    assert sd == pytest.approx(statistics.stdev(values), rel=1e-12)


def test_mean_std_single_value_has_zero_spread():
    assert mean_std([0.93]) == (0.93, 0.0)


@pytest.mark.parametrize("bad", [[], [[0.9, 0.8]], [0.9, float("nan")]])
def test_mean_std_rejects_bad_input(bad):
    with pytest.raises(RequantError):
        mean_std(bad)


# ---------------------------------------------------------------- Welch

def test_welch_seed_card_numbers():
    """The seed model card: candidate 0.9355 ± 0.0049 vs reference 0.9396 ± 0.0049, 3 seeds each."""
    result = welch(0.9355, 0.0049, 3, 0.9396, 0.0049, 3)
    oracle = sps.ttest_ind_from_stats(0.9355, 0.0049, 3, 0.9396, 0.0049, 3, equal_var=False)
    assert result.t == pytest.approx(oracle.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(oracle.pvalue, rel=1e-12)
    # By hand: se = 0.0049 * sqrt(2/3); t = -0.0041 / se; equal variances and n give df = 2 (n - 1) = 4.
    se = 0.0049 * math.sqrt(2 / 3)
    assert result.t == pytest.approx(-0.0041 / se, rel=1e-12)
    assert result.t == pytest.approx(-1.0247, abs=1e-3)
    assert result.df == pytest.approx(4.0, rel=1e-12)
    assert result.p_value == pytest.approx(2 * sps.t.sf(0.0041 / se, 4), rel=1e-12)
    assert result.p_value == pytest.approx(0.363, abs=1e-3)
    # The result: a -0.41 pp difference over 3 seeds is not significant (p ≈ 0.36 >> 0.05).
    assert result.p_value > 0.05


def test_welch_from_samples_matches_scipy_ttest_ind():
    a, b = [0.931, 0.9401, 0.9355, 0.9288], [0.9396, 0.9450, 0.9342]
    result = welch_from_samples(a, b)
    oracle = sps.ttest_ind(a, b, equal_var=False)
    assert result.t == pytest.approx(oracle.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(oracle.pvalue, rel=1e-12)
    assert result.df == pytest.approx(oracle.df, rel=1e-12)


def test_welch_one_side_without_spread_matches_scipy():
    result = welch(0.93, 0.0, 3, 0.94, 0.01, 3)
    oracle = sps.ttest_ind_from_stats(0.93, 0.0, 3, 0.94, 0.01, 3, equal_var=False)
    assert result.p_value == pytest.approx(oracle.pvalue, rel=1e-12)
    assert result.df == pytest.approx(2.0)


def test_welch_both_sds_zero():
    same = welch(0.93, 0.0, 3, 0.93, 0.0, 3)
    assert (same.t, same.p_value) == (0.0, 1.0) and math.isnan(same.df)
    worse = welch(0.92, 0.0, 3, 0.93, 0.0, 3)
    assert worse.t == -math.inf and worse.p_value == 0.0 and math.isnan(worse.df)


def test_welch_single_value_is_undefined():
    result = welch_from_samples([0.93], [0.94, 0.95])
    assert all(math.isnan(x) for x in (result.t, result.df, result.p_value))


@pytest.mark.parametrize("args", [(0.9, -0.1, 3, 0.9, 0.1, 3), (0.9, 0.1, 0, 0.9, 0.1, 3),
                                  (math.nan, 0.1, 3, 0.9, 0.1, 3)])
def test_welch_rejects_bad_input(args):
    with pytest.raises(RequantError, match="welch"):
        welch(*args)


# ---------------------------------------------------------------- McNemar

def pairs(b: int, c: int, both_right: int = 0, both_wrong: int = 0) -> tuple[list[int], list[int]]:
    """Candidate and reference outcomes with the given 2x2 table."""
    cand = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    ref = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    return cand, ref


def exact_two_sided(b: int, c: int) -> float:
    """2 * P[Binomial(b + c, 1/2) <= min(b, c)], capped at 1, in exact rational arithmetic."""
    n = b + c
    tail = Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


@pytest.mark.parametrize("b,c", [(0, 3), (3, 0), (1, 9), (12, 5), (40, 40), (117, 240), (7, 8)])
def test_mcnemar_exact_matches_binomtest_and_hand_computation(b, c):
    result = mcnemar(*pairs(b, c, both_right=30, both_wrong=4))
    assert (result.b, result.c, result.n) == (b, c, b + c + 34)
    assert result.p_exact == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
    assert result.p_exact == pytest.approx(exact_two_sided(b, c), rel=1e-9)


def test_mcnemar_textbook_presidential_approval():
    """Agresti (1990), Categorical Data Analysis, p. 350: approval of the president in two surveys of the
    same 1600 people: approve/approve 794, approve/disapprove 150, disapprove/approve 86, disapprove/
    disapprove 570. R's ?mcnemar.test runs exactly this table and prints
    "McNemar's chi-squared = 16.818, df = 1, p-value = 4.115e-05" (with continuity correction)."""
    # Reference = first survey, candidate = second survey; 1 = approve.
    cand = [1] * 794 + [0] * 150 + [1] * 86 + [0] * 570
    ref = [1] * 794 + [1] * 150 + [0] * 86 + [0] * 570
    result = mcnemar(cand, ref)
    assert (result.b, result.c, result.n) == (86, 150, 1600)
    assert result.chi2_cc == pytest.approx(16.818, abs=5e-4)
    assert result.p_chi2_cc == pytest.approx(4.115e-05, rel=1e-3)
    # Agresti's uncorrected z = (86 - 150) / sqrt(236) = -4.17.
    assert (result.b - result.c) / math.sqrt(result.b + result.c) == pytest.approx(-4.17, abs=5e-3)
    assert result.p_exact == pytest.approx(exact_two_sided(86, 150), rel=1e-9)


@pytest.mark.parametrize("b,c", [(0, 3), (12, 5), (117, 240), (1, 30)])
def test_mcnemar_chi2_continuity_corrected_by_hand(b, c):
    result = mcnemar(*pairs(b, c))
    chi2 = (abs(b - c) - 1) ** 2 / (b + c)
    assert result.chi2_cc == pytest.approx(chi2, rel=1e-12)
    # Chi-square with 1 df is the square of a standard normal: P[X > x] = erfc(sqrt(x / 2)).
    assert result.p_chi2_cc == pytest.approx(math.erfc(math.sqrt(chi2 / 2)), rel=1e-9)
    assert result.p_chi2_cc == pytest.approx(sps.chi2.sf(chi2, 1), rel=1e-12)


def test_mcnemar_no_discordant_pairs_and_ties():
    none = mcnemar(*pairs(0, 0, both_right=10, both_wrong=2))
    assert (none.b, none.c, none.p_exact, none.chi2_cc, none.p_chi2_cc) == (0, 0, 1.0, 0.0, 1.0)
    tie = mcnemar(*pairs(5, 5))
    assert tie.p_exact == 1.0 and tie.chi2_cc == 0.0 and tie.p_chi2_cc == 1.0  # as R: no correction when b == c


def test_mcnemar_rejects_bad_input():
    with pytest.raises(RequantError, match="pair up"):
        mcnemar([1, 0, 1], [1, 0])
    with pytest.raises(RequantError, match="0 or 1"):
        mcnemar([1, 2], [1, 0])


# ---------------------------------------------------------------- paired bootstrap

def synthetic_items(n: int, p_ref: float, effect: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-item mean correctness over 3 seeds; the candidate's true accuracy is p_ref + effect."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(-0.3, 0.3, n)  # items differ, both variants see the same difficulty
    p_r = np.clip(p_ref + difficulty, 0, 1)
    p_c = np.clip(p_r + effect, 0, 1)
    ref = rng.binomial(3, p_r) / 3
    cand = rng.binomial(3, p_c) / 3
    return cand, ref


def test_bootstrap_ci_contains_true_difference_and_p_small_for_large_effect():
    cand, ref = synthetic_items(1319, 0.6, -0.05, seed=1)
    result = paired_bootstrap(cand, ref, n_boot=4000, seed=0)
    assert result.delta == pytest.approx(float(np.mean(cand - ref)))
    assert result.ci_low < -0.05 < result.ci_high
    assert result.ci_low < result.delta < result.ci_high
    assert result.p_value < 1e-3
    assert result.p_value >= 1 / (4000 + 1)  # the Monte-Carlo floor


def test_bootstrap_p_large_for_zero_effect():
    cand, ref = synthetic_items(1319, 0.6, 0.0, seed=2)
    result = paired_bootstrap(cand, ref, n_boot=4000, seed=0)
    assert result.ci_low < 0.0 < result.ci_high
    assert result.p_value > 0.2
    identical = paired_bootstrap(ref, ref, n_boot=500, seed=0)
    assert (identical.delta, identical.ci_low, identical.ci_high, identical.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_bootstrap_ci_coverage():
    """Over 60 synthetic data sets with a known effect the 95 % interval covers it about 95 % of the time."""
    covered = 0
    for k in range(60):
        cand, ref = synthetic_items(300, 0.7, -0.02, seed=100 + k)
        r = paired_bootstrap(cand, ref, n_boot=1000, seed=k)
        covered += r.ci_low <= -0.02 <= r.ci_high
    assert 51 <= covered <= 60  # 85 %..100 %; the expected 57 is deterministic here


def test_bootstrap_matches_scipy_bootstrap_and_pinned_definition():
    cand, ref = synthetic_items(500, 0.8, -0.03, seed=3)
    result = paired_bootstrap(cand, ref, n_boot=10000, seed=7)
    oracle = sps.bootstrap((cand, ref), lambda a, b, axis: np.mean(a - b, axis=axis), paired=True,
                           vectorized=True, n_resamples=10000, method="percentile", rng=np.random.default_rng(11))
    assert result.ci_low == pytest.approx(oracle.confidence_interval.low, abs=1.5e-3)
    assert result.ci_high == pytest.approx(oracle.confidence_interval.high, abs=1.5e-3)
    # The definition, recomputed from the same random stream (one chunk: 10000 x 500 < the chunk size).
    idx = np.random.default_rng(7).integers(0, 500, size=(10000, 500))
    means = (cand - ref)[idx].mean(axis=1)
    delta = float(np.mean(cand - ref))
    assert (result.ci_low, result.ci_high) == tuple(np.percentile(means, [2.5, 97.5]))
    assert result.p_value == (1 + np.count_nonzero(np.abs(means - delta) >= abs(delta) - 1e-12)) / 10001


def test_bootstrap_deterministic_and_chunked(monkeypatch):
    cand, ref = synthetic_items(400, 0.7, -0.04, seed=4)
    first = paired_bootstrap(cand, ref, n_boot=3000, seed=5)
    assert paired_bootstrap(cand, ref, n_boot=3000, seed=5) == first
    assert paired_bootstrap(cand, ref, n_boot=3000, seed=6) != first
    # Small chunks that do not divide n_boot: every resample is still drawn, and the result agrees
    # with the single-chunk run up to Monte-Carlo error.
    monkeypatch.setattr(stats, "BOOTSTRAP_CELLS_PER_CHUNK", 400 * 7)
    chunked = paired_bootstrap(cand, ref, n_boot=3000, seed=5)
    assert chunked == paired_bootstrap(cand, ref, n_boot=3000, seed=5)
    assert chunked.ci_low == pytest.approx(first.ci_low, abs=3e-3)
    assert chunked.ci_high == pytest.approx(first.ci_high, abs=3e-3)
    assert chunked.n_boot == 3000 and math.isfinite(chunked.ci_low)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(RequantError, match="pair up"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(RequantError, match="n_boot"):
        paired_bootstrap([1.0], [1.0], n_boot=0)
    with pytest.raises(RequantError, match="non-empty"):
        paired_bootstrap([], [])


# ---------------------------------------------------------------- sign-flip permutation test over items

@pytest.mark.parametrize("b,c", [(0, 3), (3, 0), (1, 9), (12, 5), (40, 40), (117, 240), (7, 8)])
def test_item_permutation_with_one_seed_is_mcnemars_exact_test(b, c):
    cand, ref = pairs(b, c, both_right=30, both_wrong=4)
    result = stats.item_permutation(cand, ref)
    assert (result.n_items, result.n_seeds, result.n_differing) == (b + c + 34, 1, b + c)
    assert result.p_value == pytest.approx(exact_two_sided(b, c), rel=1e-9)
    assert result.delta == pytest.approx((b - c) / (b + c + 34), abs=1e-15)


def test_item_permutation_by_hand():
    """Three items, each wrong under all three seeds for the candidate only: S = -9. Of the 2^3 sign vectors only
    the two with all signs equal reach |S| = 9, so p = 2/8. One more item differing by one answer (+1) gives
    S = -8; |S| >= 8 holds for the same two vectors of the first three items (|±9 ± 1| >= 8), so p = 4/16."""
    ref = np.ones((3, 4), dtype=int)
    cand = ref.copy()
    cand[:, :3] = 0
    assert stats.item_permutation(cand, ref).p_value == pytest.approx(2 / 8)
    ref[0, 3] = 0
    result = stats.item_permutation(cand, ref)
    assert (result.delta, result.n_differing) == (pytest.approx(-8 / 12), 4)
    assert result.p_value == pytest.approx(4 / 16)


@pytest.mark.parametrize("seed", range(4))
def test_item_permutation_equals_scipys_exact_permutation_test(seed):
    """scipy's paired ('samples') permutation test enumerates all 2^n sign flips for n <= 13 items."""
    rng = np.random.default_rng(seed)
    n_seeds, n_items = 3, 12
    ref = (rng.random((n_seeds, n_items)) < 0.6).astype(int)
    cand = np.where(rng.random((n_seeds, n_items)) < 0.3, 1 - ref, ref)
    oracle = sps.permutation_test((cand.sum(axis=0), ref.sum(axis=0)), lambda x, y, axis: np.sum(x - y, axis=axis),
                                  permutation_type="samples", alternative="two-sided", n_resamples=np.inf)
    assert stats.item_permutation(cand, ref).p_value == pytest.approx(oracle.pvalue, rel=1e-9)


def test_item_permutation_rejects_bad_input():
    with pytest.raises(RequantError, match="pair up"):
        stats.item_permutation([[1, 0, 1]], [[1, 0]])
    with pytest.raises(RequantError, match="0 or 1"):
        stats.item_permutation([[1, 2]], [[1, 0]])
    with pytest.raises(RequantError, match=r"\[seed\]\[item\]"):
        stats.item_permutation(np.zeros((2, 2, 2), dtype=int), np.zeros((2, 2, 2), dtype=int))


def test_the_item_test_holds_alpha_where_pooled_mcnemar_does_not():
    """Under a true null with seeds correlated within items, the item test rejects at most alpha (it is exact);
    McNemar on pooled (item, seed) pairs counts each item up to three times and rejects far more often."""
    rng = np.random.default_rng(11)
    draws, alpha = 1500, 0.05
    item_p, pooled_p = [], []
    for _ in range(draws):
        cand, ref = gsm8k_like_pool(rng, 100, 3)
        item_p.append(stats.item_permutation(cand, ref).p_value)
        pooled_p.append(mcnemar(cand.ravel(), ref.ravel()).p_exact)
    item_rate, pooled_rate = np.mean(np.array(item_p) < alpha), np.mean(np.array(pooled_p) < alpha)
    noise = 3 * math.sqrt(alpha * (1 - alpha) / draws)  # three binomial standard errors: 0.017
    assert item_rate <= alpha + noise, item_rate
    assert pooled_rate > 2 * alpha, pooled_rate


@pytest.mark.parametrize("n,discordant", [(1319, 100), (200, 0), (50, 8)])
def test_item_mde_with_one_seed_is_connors_mcnemar_formula(n, discordant):
    """One seed: q = the discordant fraction, and the MDE solves Connor's (1987) power equation at 80%."""
    deltas = np.zeros(n)
    deltas[:discordant // 2] = 1.0
    deltas[discordant // 2:discordant] = -1.0
    d = stats.item_mde(deltas, 0.05)
    psi = max(discordant / n, d)
    z = sps.norm.ppf(0.975)
    assert sps.norm.cdf((math.sqrt(n) * d - z * math.sqrt(psi)) / math.sqrt(psi - d * d)) == pytest.approx(0.8, abs=1e-6)


def test_item_mde_more_seeds_help_only_where_seeds_disagree():
    """Items that answer alike under every seed gain nothing from more seeds; items whose seeds split make q smaller
    than the discordant share, and the MDE with it. No observed disagreement still gives a finite MDE."""
    fully_correlated = np.array([1.0] * 10 + [-1.0] * 10 + [0.0] * 80)
    split = np.array([1 / 3] * 10 + [-1 / 3] * 10 + [0.0] * 80)
    assert stats.item_mde(split, 0.05) < stats.item_mde(fully_correlated, 0.05) < 1.0
    assert 0 < stats.item_mde(np.zeros(100), 0.05) < 0.1
    assert math.isnan(stats.item_mde([], 0.05))
