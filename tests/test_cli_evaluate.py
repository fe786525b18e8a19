"""``requant evaluate CANDIDATE --reference REF``: the evaluate flow's downstream as one local command, on the trained
model's conversions (served by ``requant serve``, scored on its own task): the report lands in the candidate and in
its manifest, ``requant verify`` still passes, a smoke failure exits 1 after publishing, bad input is one line."""

from __future__ import annotations

import json

import pytest

import requant
from requant.cli import main
from requant.evaluation.gsm8k import TRAINED_TASK
from requant.manifest import MANIFEST_FILE

ARGS = ["--seeds", "42", "--limit", "4", "--gsm8k-dir", TRAINED_TASK, "--max-model-len", "4096"]


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, trained_upstream):
    """The trained model's amd-kimi-k25-mxfp4 conversion (passes the gate undamaged) and its fp8-reference."""
    root = tmp_path_factory.mktemp("cli-evaluate")
    for recipe in ("amd-kimi-k25-mxfp4", "fp8-reference"):
        requant.convert(str(trained_upstream), str(root / recipe), recipe, progress=False)
    return root / "amd-kimi-k25-mxfp4", root / "fp8-reference"


def _manifest(path):
    return json.loads((path / MANIFEST_FILE).read_text())


def test_evaluate_publishes_the_report_into_the_candidate(trained_pair, capsys):
    candidate, reference = trained_pair
    assert main(["evaluate", str(candidate), "--reference", str(reference), *ARGS]) == 0
    out = capsys.readouterr().out
    assert "smoke test PASSED" in out and "verdict: PASS" in out, out
    assert f"report: {candidate}/eval/report.md" in out and f"PASS: {candidate}" in out

    report = json.loads((candidate / "eval" / "report.json").read_text())
    assert report["comparison"]["verdict"] == "PASS" and report["comparison"]["n_items"] == 4
    assert report["context"]["settings"]["data"] == TRAINED_TASK and report["smoke"]["passed"]
    manifest = _manifest(candidate)
    assert {"eval/report.json", "eval/report.md", "eval/gsm8k.png", "eval/smoke.json"} <= set(manifest["outputs"])
    assert manifest["evaluations"]["eval"]["verdict"] == "PASS"
    assert "Gate: PASS" in (candidate / "README.md").read_text()
    cached = [n for n in _manifest(reference)["outputs"] if n.startswith("eval/gsm8k-")]
    assert any(n.endswith("/gsm8k.json") for n in cached)          # the reference's run, for the next candidate
    assert main(["verify", str(candidate)]) == 0 and main(["verify", str(reference)]) == 0


def test_a_damaged_candidate_exits_1_after_publishing_its_smoke_result(trained_pair, tmp_path, capsys):
    from requant.testing.trained.damage import damage

    candidate = damage(trained_pair[0], tmp_path / "damaged", "experts-sign-flipped", experts=[(1, 3), (2, 5)])
    assert main(["evaluate", str(candidate), "--reference", str(trained_pair[1]), *ARGS]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("requant evaluate: smoke test failed for"), captured.err
    assert "smoke test FAILED" in captured.out
    assert "eval/smoke.json" in _manifest(candidate)["outputs"] and not (candidate / "eval" / "report.json").exists()
    assert main(["verify", str(candidate)]) == 0


@pytest.mark.parametrize("case", ["no manifest", "missing", "unknown engine"])
def test_bad_input_is_one_line_and_status_2_before_any_engine_starts(case, trained_pair, trained_upstream, tmp_path,
                                                                      capsys, monkeypatch):
    import requant.evaluation.run

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was started for bad input")

    monkeypatch.setattr(requant.evaluation.run, "launch", no_engine)
    candidate, reference = trained_pair
    argv, expected = {
        "no manifest": ([str(trained_upstream), "--reference", str(reference)], f"no {MANIFEST_FILE}"),
        "missing": ([str(tmp_path / "nowhere"), "--reference", str(reference)], "not a directory"),
        "unknown engine": ([str(candidate), "--reference", str(reference), "--engine", "no-such-engine"],
                           "unknown engine 'no-such-engine'"),
    }[case]
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("requant evaluate: error:") and expected in err[0], err
    assert not (trained_upstream / "eval").exists()
