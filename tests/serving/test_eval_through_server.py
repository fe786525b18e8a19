"""The whole downstream on the real reference server: `requant smoke`, `requant eval` (lm-eval, 3 seeds),
`requant compare`. A random tiny model scores ~0 on GSM8K; the plumbing, statistics and files are checked."""

from __future__ import annotations

import json

import pytest

from requant.cli import main
from requant.engines.engines import launch, load_engines
from requant.testing.synth import synthesize


def test_smoke_passes_against_the_reference_variant(mxfp4_server, fp8_server, tmp_path, capsys):
    out = tmp_path / "smoke.json"
    rc = main(["smoke", mxfp4_server.base_url, "--reference-url", fp8_server.base_url, "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["passed"], capsys.readouterr().out
    assert {c["name"] for c in result["checks"]} >= {"health", "model listed", "greedy deterministic", "stop honoured",
                                                      "max_tokens honoured", "concurrent requests",
                                                      "agreement with reference",
                                                      "sequence agreement with reference", "expert coverage"}
    assert result["numeric"]["top1_agreement"] >= 0.5 and 0 < result["numeric"]["mean_kl"] < 0.1
    assert result["numeric"]["sequence"]["positions"] > 500 and result["numeric"]["coverage"]["experts_below"] == 0


def test_smoke_fails_for_a_different_model(fp8_server, tmp_path_factory):
    """Same architecture, other weights: the numeric check must catch it (exit 1)."""
    other = synthesize(tmp_path_factory.mktemp("other") / "tiny-seed1", "tiny", seed=1, progress=False)
    with launch(load_engines()["reference"], str(other), served_model_name="other", log_dir=tmp_path_factory.mktemp("l"),
                max_model_len=2048) as server:
        out = tmp_path_factory.mktemp("smoke") / "smoke.json"
        assert main(["smoke", server.base_url, "--reference-url", fp8_server.base_url, "--out", str(out)]) == 1
        failed = {c["name"] for c in json.loads(out.read_text())["checks"] if not c["passed"]}
        assert failed == {"agreement with reference", "sequence agreement with reference"}


@pytest.mark.oracle
def test_lm_eval_through_the_server_then_compare(mxfp4_server, fp8_server, gsm8k_dir, tmp_path):
    runs = {}
    for name, server in (("candidate", mxfp4_server), ("reference", fp8_server)):
        out = tmp_path / name
        assert main(["eval", server.base_url, "--limit", "2", "--gsm8k-dir", str(gsm8k_dir), "--out", str(out)]) == 0
        runs[name] = json.loads((out / "gsm8k.json").read_text())
        for seed in ("42", "1234", "7777"):
            lines = (out / f"seed-{seed}" / "samples.jsonl").read_text().splitlines()
            samples = [json.loads(line) for line in lines]
            assert len(samples) == 2 * 2                                     # 2 items x 2 filters
            prompt = samples[0]["arguments"][0][0]
            assert prompt.count("Question:") == 4                            # 3 shots + the question
            assert all("Question:" not in s["resps"][0][0] for s in samples)  # stop honoured by the server
    for run in runs.values():
        assert run["seeds"] == [42, 1234, 7777] and len(run["doc_ids"]) == 2
        for name in ("flexible-extract", "strict-match"):
            assert set(run["scores"][name]) == {"42", "1234", "7777"}
            assert all(0.0 <= v <= 1.0 for v in run["scores"][name].values())
    report = tmp_path / "report"
    rc = main(["compare", str(tmp_path / "candidate"), str(tmp_path / "reference"), "--out", str(report)])
    data = json.loads((report / "report.json").read_text())
    assert rc == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[data["comparison"]["verdict"]]
    assert (report / "gsm8k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GSM8K" in (report / "report.md").read_text()
