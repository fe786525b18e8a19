"""requant.evaluation.simulate: the gate-simulation's draws (results/gate-simulation)."""

from __future__ import annotations

import numpy as np
import pytest

from requant.errors import RequantError
from requant.evaluation.simulate import gsm8k_like_pool, pool_summary, simulate


def test_identical_variants_are_never_rejected_and_a_lost_item_set_always_is():
    rng = np.random.default_rng(0)
    ref, _ = gsm8k_like_pool(rng, 200, 5)
    same = simulate(ref, ref, mode="as measured", n_items=100, n_seeds=3, draws=50)
    assert same.rejects == {"permutation": 0.0, "mcnemar": 0.0} and same.gate_fails == same.rejects
    worse = ref.copy()
    worse[:, :60] = 0                                    # 60 of 200 items lost under every seed
    lost = simulate(worse, ref, mode="as measured", n_items=100, n_seeds=3, draws=50)
    assert lost.gate_fails["permutation"] == 1.0 and lost.gate_fails["mcnemar"] == 1.0
    swapped = simulate(worse, ref, mode="exchangeable", n_items=100, n_seeds=3, draws=200)
    assert swapped.rejects["permutation"] <= 0.05 + 3 * swapped.standard_error


def test_the_pool_summary_counts_items_alike_across_seeds():
    cand = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 1]])
    ref = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    s = pool_summary(cand, ref)
    assert (s["items"], s["seeds"], s["items_differing"], s["pooled_discordant_pairs"]) == (4, 3, 3, 7)
    assert s["candidate_items_alike_across_seeds"] == 0.75 and s["reference_items_alike_across_seeds"] == 1.0


def test_bad_arguments_are_refused():
    pool = np.ones((3, 10), dtype=int)
    with pytest.raises(RequantError, match="mode"):
        simulate(pool, pool, mode="null", n_items=5, n_seeds=3, draws=1)
    with pytest.raises(RequantError, match="n_seeds"):
        simulate(pool, pool, mode="exchangeable", n_items=5, n_seeds=4, draws=1)
    with pytest.raises(RequantError, match="one shape"):
        simulate(pool, pool[:, :5], mode="exchangeable", n_items=5, n_seeds=3, draws=1)
