"""`requant compare` exits 0 / 1 / 3 for PASS / FAIL / INCONCLUSIVE, each forced by a constructed pair of results
(per-item outcomes written as `requant eval` writes them), so a gate that always says one verdict fails here."""

from __future__ import annotations

import json

import pytest

from requant.cli import main
from requant.evaluation.gsm8k import RESULT_FILE
from requant.evaluation.results import FILTERS, GSM8KResult

SEEDS = (42, 1234, 7777)
N = 100


def _write(root, variant: str, correct: list[int]) -> str:
    """A result whose every seed and filter answered items ``correct`` (1/0 per item)."""
    items = {f: {str(s): list(correct) for s in SEEDS} for f in FILTERS}
    scores = {f: {str(s): sum(correct) / N for s in SEEDS} for f in FILTERS}
    result = GSM8KResult(variant=variant, model=variant, base_url="http://127.0.0.1:1/v1", num_fewshot=3, limit=N,
                         seeds=list(SEEDS), doc_ids=list(range(N)), scores=scores, items=items)
    out = root / variant
    out.mkdir()
    (out / RESULT_FILE).write_text(json.dumps(result.to_json()))
    return str(out)


@pytest.mark.parametrize(("reference", "candidate", "verdict", "code"), [
    ([1] * 90 + [0] * 10, [1] * 90 + [0] * 10, "PASS", 0),            # identical answers
    ([1] * 90 + [0] * 10, [1] * 70 + [0] * 30, "FAIL", 1),            # 20 items lost on every seed: p << 0.05
    ([1] * 5 + [0] * 95, [1] * 5 + [0] * 95, "INCONCLUSIVE", 3),      # a reference at 5% cannot show a loss
])
def test_compare_exit_code_follows_the_verdict(tmp_path, capsys, reference, candidate, verdict, code):
    ref, cand = _write(tmp_path, "reference", reference), _write(tmp_path, "candidate", candidate)
    rc = main(["compare", cand, ref, "--out", str(tmp_path / "report")])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["comparison"]["verdict"] == verdict, capsys.readouterr().out[-2000:]
    assert rc == code
