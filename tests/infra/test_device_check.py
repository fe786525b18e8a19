"""The prepared GPU check (infra/device_check.py) run on the CPU as CI runs it, so it cannot rot before a GPU
machine is at hand: on the CPU lane two different computations of each conversion (one transcode thread against
several, each its own process) and Quark 0.11.2's export compared and verified, the trained model served by two
separately started servers and compared, one JSON that names the device of every figure. And the check turns red
when one path is broken: a lane that computes something else, a server that serves a damaged checkpoint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "infra/device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_runs_green_on_the_cpu(tmp_path):
    out = tmp_path / "device-check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "infra/device_check.py"), "--device", "cpu", "--profile", "tiny",
                           "--prompts", "2", "--decode-tokens", "8", "--work", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["environment"]["device"] == "cpu"
    assert result["oracle"]["tool"] == "amd-quark 0.11.2" and result["oracle"]["device"] == "cpu"
    assert set(result["conversion"]) == {"amd-kimi-mxfp4", "fp8-reference"}
    for check in result["conversion"].values():
        runs = check["runs"]
        assert check["identical"] and len(runs) == 2
        assert {run["device"] for run in runs.values()} == {"cpu"}
        assert sorted(run["threads"] for run in runs.values())[0] == 1 < max(run["threads"] for run in runs.values())
        assert len({run["pid"] for run in runs.values()}) == 2  # two processes, not one run reported twice
        for run in runs.values():
            assert run["verify"] and run["equals_quark"] and run["tensors"] > 0
            assert run["wall_s"] > 0 and run["peak_rss_mb"] > 100
            assert 0 < run["transcode_share"] < 2 * result["environment"]["cores"]
    serving = result["serving"]
    servers = serving["servers"]
    assert servers["reference"]["device"] == servers["candidate"]["device"] == "cpu"
    assert servers["candidate"]["threads"] == 1 and servers["reference"]["pid"] != servers["candidate"]["pid"]
    assert serving["smoke_passed"] and serving["sequence"]["top1_all_positions"] == 1.0
    assert serving["tokens_per_s"]["cpu"]["decode_tok_s"] > 0
    assert "PASSED" in proc.stdout and "| amd-kimi-mxfp4 | cpu-1-thread | cpu, 1 |" in proc.stdout
    assert not list(tmp_path.glob("requant-device-check-*"))  # its work folder is removed
    leftover = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftover, f"servers left running: {leftover}"  # both servers stopped


def test_a_lane_that_computes_something_else_turns_the_check_red(device_check, tmp_path, monkeypatch):
    """One lane broken into a valid checkpoint that is not the recipe's (the router quantized too): verify passes
    on it, so only the comparisons, with the other lane and with Quark's export, can stop it."""
    from requant.testing.synth import synthesize

    recipe = "amd-kimi-mxfp4"
    monkeypatch.setattr(device_check, "RECIPES", (recipe,))
    upstream = synthesize(tmp_path / "upstream", "tiny", seed=0, progress=False)
    real = device_check.measured_convert

    def broken_single_thread(src, dst, _recipe, device, threads):
        return real(src, dst, "kimi-k2.6-mxfp4" if threads == 1 else _recipe, device, threads)

    monkeypatch.setattr(device_check, "measured_convert", broken_single_thread)
    oracle = device_check.quark_exports(upstream, tmp_path / "quark")
    check = device_check.conversion_checks(upstream, tmp_path, "cpu", oracle["dir"])[recipe]
    broken, sound = check["runs"]["cpu-1-thread"], check["runs"]["cpu-threads"]
    assert broken["verify"] and sound["verify"]
    assert not check["identical"] and not device_check.conversion_passed(check)
    assert not broken["equals_quark"] and sound["equals_quark"]
    assert any(".mlp.gate." in name for name in broken["differs_from_quark"])


def test_a_server_that_serves_a_damaged_checkpoint_turns_the_check_red(device_check, tmp_path, monkeypatch):
    import requant.engines.engines as engines
    from requant.testing.trained.damage import damage

    real = engines.launch

    def launch(spec, model, *, served_model_name, **kwargs):
        if served_model_name.endswith("candidate"):
            model = str(damage(model, Path(model).with_name("damaged"), "scales-x2"))
        return real(spec, model, served_model_name=served_model_name, **kwargs)

    monkeypatch.setattr(engines, "launch", launch)
    serving = device_check.serving_checks(tmp_path, "cpu", decode_len=8, prompts=2)
    assert not serving["smoke_passed"] and serving["failed_checks"]
    assert serving["servers"]["candidate"]["pid"] != serving["servers"]["reference"]["pid"]
