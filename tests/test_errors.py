"""requant errors: one line, and intact across process boundaries."""

from __future__ import annotations


def test_errors_survive_pickling():
    """Errors cross Ray and Prefect process boundaries; they must arrive with their message intact."""
    import pickle

    from requant.errors import CheckpointError, PlanError, VerifyError

    for err in (CheckpointError("a/b.safetensors", "bad\nthing", "t.weight"), PlanError(["p1", "p2"]), VerifyError(["v"])):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
    assert pickle.loads(pickle.dumps(PlanError(["p1", "p2"]))).problems == ["p1", "p2"]
