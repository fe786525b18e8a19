"""How often the gate FAILs an honest conversion, by simulation over measured per-item outcomes.

Given two variants' 0/1 outcomes as [seed][item] (an honest conversion and its reference, answered under the same
seeds), each draw resamples ``n_items`` items with replacement and ``n_seeds`` of the measured seeds without
replacement, and then either:

* ``"exchangeable"``: swaps the two variants' outcomes on a random half of the items. This makes the null
  hypothesis exactly true (neither variant is better) while keeping every item's own correlation across seeds and
  between the variants, so the share of draws a test rejects is its real false-positive rate;
* ``"as measured"``: keeps the pair as it is, so the share of draws the gate FAILs is how often this honest
  conversion would be turned away by an evaluation of that size.

Per draw and paired test (the sign-flip test over items, and McNemar on pooled (item, seed) pairs) it records
whether the test rejects at ``alpha`` (p < alpha, either direction) and whether the gate FAILs (a drop of more than
``max_drop_pp`` and p < alpha). Pure numpy; deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from requant.errors import RequantError
from requant.evaluation.stats import item_mde, item_permutation, mcnemar

MODES = ("exchangeable", "as measured")
TESTS = ("permutation", "mcnemar")


@dataclass(frozen=True)
class Rates:
    mode: str
    n_items: int
    n_seeds: int
    draws: int
    rejects: dict[str, float]     # test -> share of draws with p < alpha
    gate_fails: dict[str, float]  # test -> share of draws the gate FAILs (drop > max_drop_pp and p < alpha)
    standard_error: float         # binomial standard error of a share of alpha over this many draws
    mde: float                    # the item test's 80%-power MDE (median over the draws), n_items x n_seeds


def gsm8k_like_pool(rng: np.random.Generator, n_items: int, n_seeds: int, unstable: float = 0.15,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Two variants of equal quality whose outcomes, like GSM8K's under few-shot seeds, are mostly fixed by the
    item: each item has a difficulty shared by both variants and all seeds (Beta(0.6, 0.25): most items nearly
    always right, some nearly always wrong, about 70% accuracy); on a share ``unstable`` of the items either
    variant's answer is redrawn per seed at even odds."""
    p_item = rng.beta(0.6, 0.25, n_items)
    shaky = rng.random(n_items) < unstable
    p_item = np.where(shaky, 0.5, p_item)
    fixed = np.broadcast_to(rng.random((2, 1, n_items)) < p_item, (2, n_seeds, n_items))
    redrawn = rng.random((2, n_seeds, n_items)) < p_item
    outcomes = np.where(shaky, redrawn, fixed).astype(np.int64)
    return outcomes[0], outcomes[1]


def pool_summary(cand: np.ndarray, ref: np.ndarray) -> dict[str, float | int]:
    """How the measured outcomes hang together: accuracy, items answered alike under every seed, and discordance."""
    _check(cand, ref)
    seeds, items = cand.shape
    totals = (cand - ref).sum(axis=0)
    return {"seeds": seeds, "items": items, "candidate_accuracy": float(cand.mean()),
            "reference_accuracy": float(ref.mean()),
            "candidate_items_alike_across_seeds": _alike_across_seeds(cand),
            "reference_items_alike_across_seeds": _alike_across_seeds(ref),
            "pooled_discordant_pairs": int(np.count_nonzero(cand != ref)),
            "items_differing": int(np.count_nonzero(totals)),
            "per_item_second_moment": float(np.mean((totals / seeds) ** 2))}


def _alike_across_seeds(outcomes: np.ndarray) -> float:
    """The share of items answered the same under every seed."""
    return float(np.all(outcomes == outcomes[0], axis=0).mean())


def _check(cand: np.ndarray, ref: np.ndarray) -> None:
    if cand.shape != ref.shape or cand.ndim != 2:
        raise RequantError(f"simulate: outcomes must be [seed][item] of one shape, got {cand.shape} and {ref.shape}")


def simulate(cand: np.ndarray, ref: np.ndarray, *, mode: str, n_items: int, n_seeds: int, draws: int,
             alpha: float = 0.05, max_drop_pp: float = 1.0, seed: int = 0) -> Rates:
    """Rejection and gate-FAIL rates of each paired test over ``draws`` resampled evaluations (see the module)."""
    _check(cand, ref)
    if mode not in MODES:
        raise RequantError(f"simulate: mode must be one of {MODES}, got {mode!r}")
    if not 1 <= n_seeds <= cand.shape[0]:
        raise RequantError(f"simulate: n_seeds must be 1..{cand.shape[0]} (the seeds measured), got {n_seeds}")
    rng = np.random.default_rng(seed)
    rejects = dict.fromkeys(TESTS, 0)
    fails = dict.fromkeys(TESTS, 0)
    mdes = []
    for _ in range(draws):
        items = rng.integers(0, cand.shape[1], n_items)
        seeds = rng.choice(cand.shape[0], n_seeds, replace=False)
        c, r = cand[np.ix_(seeds, items)], ref[np.ix_(seeds, items)]
        if mode == "exchangeable":
            swap = rng.random(n_items) < 0.5
            c, r = np.where(swap, r, c), np.where(swap, c, r)
        drop_pp = -100.0 * float(c.mean() - r.mean())
        mdes.append(item_mde(c.mean(axis=0) - r.mean(axis=0), alpha))
        p = {"permutation": item_permutation(c, r).p_value, "mcnemar": mcnemar(c.ravel(), r.ravel()).p_exact}
        for test in TESTS:
            rejects[test] += p[test] < alpha
            fails[test] += p[test] < alpha and drop_pp > max_drop_pp + 1e-9
    return Rates(mode=mode, n_items=n_items, n_seeds=n_seeds, draws=draws,
                 rejects={t: v / draws for t, v in rejects.items()}, gate_fails={t: v / draws for t, v in fails.items()},
                 standard_error=math.sqrt(alpha * (1 - alpha) / draws), mde=float(np.median(mdes)))
