"""The prepared GPU check (infra/device_check.py) run on the CPU as CI runs it, so it cannot rot before a GPU
machine is at hand: conversions compared and verified, the trained model served twice and compared, one JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def test_device_check_runs_green_on_the_cpu(tmp_path):
    out = tmp_path / "device-check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "infra/device_check.py"), "--device", "cpu", "--profile", "tiny",
                           "--prompts", "2", "--decode-tokens", "8", "--work", str(tmp_path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["environment"]["device"] == "cpu"
    assert set(result["conversion"]) == {"amd-kimi-mxfp4", "fp8-reference"}
    for check in result["conversion"].values():
        run = check["runs"]["cpu"]
        assert check["identical"] and run["verify"] and run["wall_s"] > 0 and run["peak_rss_mb"] > 100
        assert 0 < run["transcode_share"] < 2 * result["environment"]["cores"]
    serving = result["serving"]
    assert serving["smoke_passed"] and serving["sequence"]["top1_all_positions"] == 1.0
    assert serving["tokens_per_s"]["cpu"]["decode_tok_s"] > 0
    assert "PASSED" in proc.stdout and "| amd-kimi-mxfp4 | cpu |" in proc.stdout
    assert not list(tmp_path.glob("requant-device-check-*"))  # its work folder is removed
    leftover = [p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not leftover, f"servers left running: {leftover}"  # both servers stopped
