"""The statistics that compare two evaluated variants: pure numpy/scipy, no I/O.

* :func:`mean_std` and :func:`welch` summarise and compare per-seed accuracies (unpaired, few values).
* :func:`item_permutation` is the gate's paired test: an exact sign-flip permutation test over items, the unit
  of a GSM8K evaluation. One item answered under several few-shot seeds is one observation, not several: its
  outcomes under the seeds are strongly correlated, so tests that pool (item, seed) pairs are anti-conservative.
  :func:`item_mde` is the smallest drop it detects with a given power.
* :func:`mcnemar` compares paired 0/1 outcomes through their discordant pairs. On pooled (item, seed) pairs it
  is kept for comparison with published cards; with one seed it is the same test as :func:`item_permutation`.
* :func:`paired_bootstrap` resamples items to get a confidence interval and p-value for the mean paired
  difference.

Each returns a frozen dataclass; invalid input raises :class:`~requant.errors.RequantError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy import stats as sps

from requant.errors import RequantError

# Resamples x items held in memory at once by paired_bootstrap: 4M int64 indices = 32 MiB.
BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class WelchResult:
    t: float        # (mean_a - mean_b) / standard error; +-inf when both sds are 0 and the means differ
    df: float       # Welch-Satterthwaite degrees of freedom; nan when undefined (both sds 0, or n < 2)
    p_value: float  # two-sided; nan when a side has fewer than two values


@dataclass(frozen=True)
class McNemarResult:
    b: int            # candidate correct, reference wrong
    c: int            # candidate wrong, reference correct
    n: int            # pairs compared (concordant ones included)
    p_exact: float    # two-sided exact binomial test of b against Binomial(b + c, 1/2)
    chi2_cc: float    # McNemar's chi-square with Edwards' continuity correction
    p_chi2_cc: float  # its p-value, chi-square with 1 degree of freedom


@dataclass(frozen=True)
class PermutationResult:
    delta: float      # mean over items of (candidate - reference), each item averaged over the seeds
    p_value: float    # two-sided, exact: the share of the 2^n sign assignments at least as extreme
    n_items: int      # items compared
    n_seeds: int      # seeds each item was answered under
    n_differing: int  # items whose candidate and reference totals over the seeds differ (the rest carry no sign)


@dataclass(frozen=True)
class BootstrapResult:
    delta: float    # observed mean of (candidate - reference) over items
    ci_low: float   # 2.5th percentile of the bootstrap distribution of the mean difference
    ci_high: float  # 97.5th percentile
    p_value: float  # two-sided, from the centred bootstrap distribution (see paired_bootstrap)
    n_items: int
    n_boot: int


def _as_vector(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise RequantError(f"{what}: expected a non-empty 1-D sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise RequantError(f"{what}: contains NaN or infinite values")
    return array


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the deviation of a single value is 0.0."""
    array = _as_vector(values, "mean_std")
    std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
    return float(np.mean(array)), std


def welch(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int) -> WelchResult:
    """Welch's two-sided t-test from summary statistics (unequal variances).

    t = (mean_a - mean_b) / sqrt(sd_a²/n_a + sd_b²/n_b) with Welch-Satterthwaite degrees of freedom.
    When both standard deviations are 0 the statistic is undefined; we return df = nan and p = 1.0 when
    the means are equal (t = 0) or p = 0.0 when they differ (t = ±inf): with no spread at all, any
    difference is the whole story. With fewer than two values on either side there is no variance
    estimate for that side, and t, df and p are all nan.
    """
    for name, sd, n in (("a", sd_a, n_a), ("b", sd_b, n_b)):
        if n < 1:
            raise RequantError(f"welch: n_{name} must be at least 1, got {n}")
        if not (math.isfinite(sd) and sd >= 0):
            raise RequantError(f"welch: sd_{name} must be a finite number >= 0, got {sd}")
    if not (math.isfinite(mean_a) and math.isfinite(mean_b)):
        raise RequantError(f"welch: means must be finite, got {mean_a} and {mean_b}")
    if n_a < 2 or n_b < 2:
        return WelchResult(t=math.nan, df=math.nan, p_value=math.nan)
    diff = mean_a - mean_b
    var_a, var_b = sd_a**2 / n_a, sd_b**2 / n_b
    se2 = var_a + var_b
    if se2 == 0.0:
        if diff == 0.0:
            return WelchResult(t=0.0, df=math.nan, p_value=1.0)
        return WelchResult(t=math.copysign(math.inf, diff), df=math.nan, p_value=0.0)
    denom = var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1)
    df = se2**2 / denom
    t = diff / math.sqrt(se2)
    return WelchResult(t=t, df=df, p_value=float(2.0 * sps.t.sf(abs(t), df)))


def welch_from_samples(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """:func:`welch` on two samples, via :func:`mean_std`."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_std(a), mean_std(b)
    return welch(mean_a, sd_a, len(a), mean_b, sd_b, len(b))


def _binary(values: Sequence[int], what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise RequantError(f"{what}: expected a 1-D sequence of 0/1, got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        bad = sorted({float(v) for v in np.unique(array) if v not in (0, 1)})[:5]
        raise RequantError(f"{what}: outcomes must be 0 or 1, found {bad}")
    return array.astype(bool)


def mcnemar(cand: Sequence[int], ref: Sequence[int]) -> McNemarResult:
    """McNemar's test on paired 0/1 outcomes of the candidate and the reference.

    b = candidate right & reference wrong, c = candidate wrong & reference right. Exact p =
    min(1, 2·P[Binomial(b+c, 1/2) <= min(b, c)]), 1 when b + c = 0. The chi-square uses Edwards'
    correction (|b - c| - 1)² / (b + c), taken as 0 when b = c (as R's mcnemar.test does), and
    chi2_cc = 0, p = 1 when b + c = 0.
    """
    c_arr, r_arr = _binary(cand, "mcnemar candidate"), _binary(ref, "mcnemar reference")
    if c_arr.shape != r_arr.shape:
        raise RequantError(f"mcnemar: candidate has {c_arr.size} outcomes, reference {r_arr.size}; they must pair up")
    b = int(np.count_nonzero(c_arr & ~r_arr))
    c = int(np.count_nonzero(~c_arr & r_arr))
    discordant = b + c
    if discordant == 0:
        return McNemarResult(b=b, c=c, n=int(c_arr.size), p_exact=1.0, chi2_cc=0.0, p_chi2_cc=1.0)
    p_exact = min(1.0, 2.0 * float(sps.binom.cdf(min(b, c), discordant, 0.5)))
    chi2_cc = max(abs(b - c) - 1, 0) ** 2 / discordant
    return McNemarResult(b=b, c=c, n=int(c_arr.size), p_exact=p_exact, chi2_cc=chi2_cc,
                         p_chi2_cc=float(sps.chi2.sf(chi2_cc, 1)))


def _outcome_grid(values: Sequence[Sequence[int]] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise RequantError(f"{what}: expected 0/1 outcomes as [seed][item], got shape {array.shape}")
    return _binary(array.ravel(), what).reshape(array.shape).astype(np.int64)


def item_permutation(cand: Sequence[Sequence[int]] | np.ndarray,
                     ref: Sequence[Sequence[int]] | np.ndarray) -> PermutationResult:
    """Exact paired sign-flip permutation test over items (Fisher 1935; Pitman 1937) of candidate - reference.

    ``cand`` and ``ref`` are 0/1 outcomes as [seed][item] (a 1-D sequence is one seed). Each item's total
    difference over the k seeds, m_i = sum_s (cand - ref), is an integer in [-k, k]. Under the null hypothesis the
    two variants are exchangeable within an item, so every sign of every m_i is equally likely and the statistic
    S = sum_i m_i has the exact distribution of sum_i e_i |m_i| over the 2^n sign vectors e. Items sharing the value
    |m_i| = v contribute v·(2·Binomial(count_v, 1/2) - count_v), so the distribution is the convolution of k scaled
    binomials: exact, deterministic and cheap for any n (no Monte Carlo). p = P(|S| >= |s_observed|).

    The seeds stay inside an item, so their correlation is respected; with one seed this is McNemar's exact test.
    """
    c_arr, r_arr = _outcome_grid(cand, "item_permutation candidate"), _outcome_grid(ref, "item_permutation reference")
    if c_arr.shape != r_arr.shape:
        raise RequantError(f"item_permutation: candidate outcomes have shape {c_arr.shape}, reference {r_arr.shape}; "
                           "they must pair up as [seed][item]")
    k, n = c_arr.shape
    totals = (c_arr - r_arr).sum(axis=0)
    observed = int(totals.sum())
    magnitudes = np.abs(totals)
    # dist[j] = P(S = j - offset); start from S = 0 and fold in each magnitude's scaled binomial.
    dist = np.ones(1)
    for v in range(1, k + 1):
        count = int(np.count_nonzero(magnitudes == v))
        if count == 0:
            continue
        spread = np.zeros(2 * v * count + 1)
        spread[::2 * v] = sps.binom.pmf(np.arange(count + 1), count, 0.5)  # S_v = v·(2j - count), j ~ Bin(count, ½)
        dist = np.convolve(dist, spread)
    offset = (dist.size - 1) // 2
    values = np.arange(dist.size) - offset
    # Half a unit of tolerance: S is an integer, so this only keeps float rounding of |values| out of the count.
    p_value = float(min(1.0, dist[np.abs(values) >= abs(observed) - 0.5].sum()))
    return PermutationResult(delta=observed / (k * n), p_value=p_value, n_items=n, n_seeds=k,
                             n_differing=int(np.count_nonzero(totals)))


def item_mde(item_deltas: Sequence[float] | np.ndarray, alpha: float, power: float = 0.8) -> float:
    """The smallest accuracy drop (a fraction) that :func:`item_permutation` at two-sided ``alpha`` detects with
    ``power``, given the observed per-item differences (each item's candidate - reference, averaged over the seeds).

    Normal approximation of the sign-flip test: with n items, mean difference d and second moment q = mean(d_i²),
    the statistic's null variance is n·q and its spread under the alternative n·(q - d²), so the power is
    Phi((sqrt(n)·d - z_(1-alpha/2)·sqrt(q)) / sqrt(q - d²)). This is Connor's (1987) McNemar formula with the
    discordant fraction replaced by q, and equals it for one seed. q is taken as max(observed, d): a drop that
    shows as whole items lost under every seed, as GSM8K's items mostly answer alike whatever the few-shot seed.
    So more seeds lower the MDE only as far as the observed items disagree across seeds, and two variants that
    never disagreed still get a finite MDE. NaN for no items; 1.0 if no drop is detectable.
    """
    deltas = np.asarray(item_deltas, dtype=np.float64)
    n = deltas.size
    if n == 0:
        return float("nan")
    z_alpha = NormalDist().inv_cdf(1 - alpha / 2)
    observed = float(np.mean(deltas * deltas))

    def achieved(d: float) -> float:
        q = max(observed, d)
        spread = q - d * d
        if spread <= 0:
            return 1.0
        return NormalDist().cdf((math.sqrt(n) * d - z_alpha * math.sqrt(q)) / math.sqrt(spread))

    if achieved(1.0) < power:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if achieved(mid) >= power else (mid, hi)
    return hi


def paired_bootstrap(cand_items: Sequence[float], ref_items: Sequence[float], n_boot: int = 10000,
                     seed: int = 0) -> BootstrapResult:
    """Paired bootstrap over items of the mean difference candidate - reference.

    Inputs are per-item scores (e.g. each item's mean correctness over seeds), aligned by position.
    Items are resampled with replacement ``n_boot`` times (numpy's default_rng(seed); deterministic for a
    given seed and input). The CI is the 95 % percentile interval of the resampled mean differences.
    The p-value tests "mean difference = 0" by shifting the bootstrap distribution to the null
    (centring it on 0): p = (1 + #{|m*_k - delta| >= |delta|}) / (n_boot + 1), where m*_k are the
    resampled means and delta the observed one; the +1s make it a valid Monte-Carlo p-value (never 0).
    """
    cand, ref = _as_vector(cand_items, "bootstrap candidate"), _as_vector(ref_items, "bootstrap reference")
    if cand.shape != ref.shape:
        raise RequantError(f"paired_bootstrap: candidate has {cand.size} items, reference {ref.size}; "
                           "they must pair up")
    if n_boot < 1:
        raise RequantError(f"paired_bootstrap: n_boot must be at least 1, got {n_boot}")
    diff = cand - ref
    n = diff.size
    delta = float(diff.mean())
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CELLS_PER_CHUNK // n)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    ci_low, ci_high = np.percentile(means, [2.5, 97.5])
    # Tolerance so that float noise in a mean equal to delta does not decide the count.
    extreme = np.count_nonzero(np.abs(means - delta) >= abs(delta) - 1e-12)
    p_value = min(1.0, (1 + int(extreme)) / (n_boot + 1))
    return BootstrapResult(delta=delta, ci_low=float(ci_low), ci_high=float(ci_high), p_value=p_value,
                           n_items=n, n_boot=n_boot)
