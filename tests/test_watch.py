"""The watcher's pieces without services: revision markers, conditional claims, and the decision table."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from requant.errors import RequantError
from requant.watch import Attempt, Ledger, decide, latest_revision


def test_mirror_revision_marker(tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs/main").write_text("abc123\n")
    rev = latest_revision(str(tmp_path))
    assert rev.revision == "abc123" and rev.snapshot == f"{tmp_path}/snapshots/abc123"
    (tmp_path / "refs/main").write_text("../../etc/passwd")
    with pytest.raises(RequantError, match="not a revision id"):
        latest_revision(str(tmp_path))
    with pytest.raises(RequantError, match="no refs/dev"):
        latest_revision(str(tmp_path), ref="dev")


def test_only_one_of_many_concurrent_claims_wins(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger"))
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: ledger.claim("rev1", 1, f"w{i}"), range(16)))
    assert wins.count(True) == 1
    attempts = ledger.attempts("rev1")
    assert [a.number for a in attempts] == [1] and attempts[0].flow_run_id is None
    ledger.record_run("rev1", 1, "run-1", "s3://out/rev1/x")
    assert ledger.attempts("rev1")[0].flow_run_id == "run-1" and ledger.revisions() == ["rev1"]


def _attempt(n, run="r", claimed=0.0):
    return Attempt("rev", n, claimed, "w", run and f"{run}{n}")


@pytest.mark.parametrize("attempts,states,expected", [
    ([], {}, ("submit", 1)),
    ([_attempt(1)], {"r1": "COMPLETED"}, ("done", 1)),
    ([_attempt(1)], {"r1": "RUNNING"}, ("wait", 1)),
    ([_attempt(1)], {"r1": "SCHEDULED"}, ("wait", 1)),
    ([_attempt(1)], {"r1": "FAILED"}, ("submit", 2)),
    ([_attempt(1)], {"r1": "CRASHED"}, ("submit", 2)),
    ([_attempt(1)], {}, ("submit", 2)),                                  # the run was deleted
    ([_attempt(1), _attempt(2), _attempt(3)], {"r3": "FAILED"}, ("give-up", 3)),
    ([_attempt(1, run=None, claimed=990.0)], {}, ("wait", 1)),           # claimed 10 s ago, run not recorded yet
    ([_attempt(1, run=None, claimed=0.0)], {}, ("submit", 2)),           # the claiming watcher died
])
def test_decision_table(attempts, states, expected):
    d = decide(attempts, states, max_attempts=3, now=1000.0, claim_timeout_s=600)
    assert (d.action, d.attempt) == expected and d.reason

