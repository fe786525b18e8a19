"""requant bench peers without running the peers: its table from a results dict of the recorded shape, its
process-tree measurement on a small tree, and the message of a missing virtualenv."""

from __future__ import annotations

import sys

import pytest

from requant.bench.peers import _measure, env_python, ratios, render
from requant.errors import RequantError


def _run(tool: str, variant: str, env: str, seconds: float, rss: float, peer: bool = True, **extra) -> dict:
    return {"tool": tool, "variant": variant, "env": env, "peer": peer, "seconds": seconds, "cpu_percent": 180.0,
            "peak_rss_mb": rss, "peak_anon_mb": rss / 2, "largest_process_rss_mb": rss, "processes": 1,
            "samples": 10, "rss_over_baseline_mb": rss - 400, **extra}


def _recorded() -> dict:
    versions = {"torch": "2.9.1", "amd-quark": "0.11.2", "compressed-tensors": "0.12.2", "llmcompressor": None,
                "transformers": "5.24.0"}
    runs = {
        "quark-0.11": _run("Quark 0.11.2", "file-to-file, 1 process", "project", 120.0, 3100),
        "requant-0.11": _run("requant", "convert --local (Quark 0.11 target)", "project", 12.0, 900, peer=False,
                             same_as={"run": "quark-0.11", "tensors": 120, "differ": 0, "first_differ": [],
                                      "only_one_side": 0, "first_only_one_side": [], "identical": True}),
        "llmc": _run("llm-compressor 0.14", "model_free_ptq MXFP4, max_workers=2 (threads)", "llmc", 60.0, 2500,
                     same_as={"run": "quark-0.11", "rename": {".weight_packed": ".weight"}, "tensors": 120,
                              "differ": 2, "first_differ": ["a.weight", "b.weight"], "only_one_side": 0,
                              "first_only_one_side": [], "identical": False}),
        "quark-0.13": _run("Quark 0.13", "file-to-file, 1 process", "quark13", 90.0, 3000),
        "quark-0.13-workers": _run("Quark 0.13", "file-to-file, 2 worker processes", "quark13", 50.0, 4200,
                                   same_as={"run": "quark-0.13", "files": 12, "differ": [],
                                            "json_reordered": ["model.safetensors.index.json"], "identical": True}),
        "requant-0.13": _run("requant", "convert --local --quark-version 0.13", "project", 9.0, 950, peer=False,
                             same_as={"run": "quark-0.13", "tensors": 120, "differ": 1, "first_differ": ["c.weight"],
                                      "only_one_side": 1, "first_only_one_side": ["d.weight"], "identical": False}),
    }
    runs["quark-0.13-workers"]["processes"] = 3
    return {
        "run": {"date": "2026-12-03 17:00 UTC", "commit": "abc1234", "python": "3.11.7", "versions": versions,
                "cpu": "Test CPU", "cores": 2},
        "cores": 2, "recipe": "amd-kimi-mxfp4",
        "fixture": {"profile": "k26-layer", "experts": 16, "upstream": "/dev/shm/x/upstream",
                    "shard_bytes": 1_700_000_000, "where": "/dev/shm"},
        "envs": {env: {"python": f"/x/{env}/bin/python", "versions": versions,
                       "torch_baseline": {"seconds": 1.0, "peak_rss_mb": 400.0}}
                 for env in ("project", "quark13", "llmc")},
        "runs": runs, "ratios": ratios(runs),
        "llmc_output": {"format": "mxfp4-pack-quantized", "quant_method": "compressed-tensors", "ct_version": "0.19.0",
                        "keeps_upstream_text_config_quantization": True, "upstream_text_config_format": "pack-quantized"},
    }


def test_render_has_every_run_the_checks_and_the_ratios():
    results = _recorded()
    text = render(results)
    assert text.startswith("# requant and its peers (synth --profile k26-layer --experts 16: 1.70 GB of shards, outputs "
                           "on /dev/shm, 2 cores)\n\n## amd-kimi-mxfp4\n")
    assert "| Quark 0.11.2 | file-to-file, 1 process | 120.0 | 180 | 1 | 3100 | 2700 |  |" in text
    assert "Quark 0.11.2 (file-to-file, 1 process): all 120 tensors byte-identical |" in text
    assert "| Quark 0.13 | file-to-file, 2 worker processes | 50.0 | 180 | 3 | 4200 | 3800 | Quark 0.13 (file-to-file, " \
           "1 process): all 12 files byte-identical but model.safetensors.index.json (the same JSON, its keys in " \
           "another order) |" in text
    assert "1 of 120 tensors differ, 1 on one side only (first: c.weight, d.weight)" in text
    assert "2 of 120 tensors differ, 0 on one side only (first: a.weight, b.weight) with .weight_packed read as " \
           ".weight" in text
    # fastest peer: Quark 0.13 with workers (50 s); lightest: llm-compressor (2500 MB)
    assert results["ratios"]["targets"] == {"amd-kimi-mxfp4": {"fastest_peer": "quark-0.13-workers",
                                                               "lightest_peer": "llmc"}}
    assert "convert --local (Quark 0.11 target): 4.17x the fastest peer, peak RSS 0.36 of the lightest peer's: " \
           "target not met" in text
    assert "convert --local --quark-version 0.13: 5.56x the fastest peer, peak RSS 0.38 of the lightest peer's: " \
           "target met" in text
    assert "mxfp4-pack-quantized" in text and "keeps the upstream's INT4 quantization_config (pack-quantized)" in text
    assert "project 400 MB (torch 2.9.1)" in text


def test_render_of_a_run_cut_short_has_what_was_measured():
    results = _recorded()
    del results["ratios"], results["llmc_output"]
    results["runs"] = {name: results["runs"][name] for name in ("quark-0.11", "quark-0.13-workers")}
    results["fixture"].update(profile=None, experts=None)  # an upstream given, not synthesized
    text = render(results)
    assert text.startswith("# requant and its peers (/dev/shm/x/upstream: 1.70 GB of shards")
    assert "Quark 0.11.2" in text and "Fastest peer" not in text and "llm-compressor writes" not in text
    assert "| quark-0.13: all 12 files byte-identical but" in text  # a row not measured is named by its key


def test_ratios_target():
    runs = {"peer": _run("p", "v", "project", 50.0, 1000), "requant": _run("r", "v", "project", 10.0, 1000, peer=False)}
    assert ratios(runs)["requant"] == {"target": "amd-kimi-mxfp4", "speedup_vs_fastest": 5.0, "rss_vs_lightest": 1.0,
                                       "target_met": True}


def test_each_target_is_raced_against_its_own_peers():
    """A requant run of ct-nvfp4a16 is measured against llm-compressor's NVFP4A16 run, not the Quark target's peers;
    each target has its own section, fastest and lightest peer."""
    results = _recorded()
    results["runs"].update({
        "llmc-ct-nvfp4a16": _run("llm-compressor 0.14", "model_free_ptq NVFP4A16", "llmc", 40.0, 2000,
                                 target="ct-nvfp4a16"),
        "requant-ct-nvfp4a16": _run("requant", "convert --local", "project", 10.0, 900, peer=False,
                                    target="ct-nvfp4a16",
                                    same_as={"run": "llmc-ct-nvfp4a16", "tensors": 120, "differ": 32,
                                             "first_differ": ["e.weight_global_scale"], "only_one_side": 0,
                                             "first_only_one_side": [], "identical": False})})
    results["ratios"] = ratios(results["runs"])
    assert results["ratios"]["targets"]["ct-nvfp4a16"] == {"fastest_peer": "llmc-ct-nvfp4a16",
                                                           "lightest_peer": "llmc-ct-nvfp4a16"}
    assert results["ratios"]["requant-ct-nvfp4a16"]["speedup_vs_fastest"] == 4.0  # 40 s / 10 s, not 50 s / 10 s
    assert results["ratios"]["requant-0.13"]["speedup_vs_fastest"] == 50.0 / 9.0   # unchanged by the new target
    text = render(results)
    section = text.split("## ct-nvfp4a16\n", 1)[1]
    assert "## amd-kimi-mxfp4" in text.split("## ct-nvfp4a16", 1)[0]
    assert "| llm-compressor 0.14 | model_free_ptq NVFP4A16 | 40.0 |" in section and "| Quark" not in section
    assert "32 of 120 tensors differ" in section
    assert "- requant convert --local: 4.00x the fastest peer, peak RSS 0.45 of the lightest peer's: target not met" \
        in section


# Two children that each hold ~150 MB at the same time: the tree's peak is their sum, the kernel's largest
# process one of them.
TREE = """
import subprocess, sys
hold = "import time; b = b'x' * (150 << 20); time.sleep(1.5)"
kids = [subprocess.Popen([sys.executable, "-c", hold]) for _ in range(2)]
for k in kids:
    k.wait()
"""


def test_measure_adds_up_the_process_tree(tmp_path):
    m = _measure([sys.executable, "-c", TREE], tmp_path / "log")
    assert m["processes"] == 3
    assert 150 <= m["largest_process_rss_mb"] < 250
    assert m["peak_rss_mb"] >= 300
    assert m["seconds"] >= 1.5


def test_measure_failure_carries_the_commands_output(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _measure([sys.executable, "-c", "import sys; sys.exit('boom')"], tmp_path / "log")


def test_a_missing_virtualenv_names_the_make_target(tmp_path):
    with pytest.raises(RequantError, match=r"\.venv-llmc/bin/python is missing: `make llmc-venv` builds it"):
        env_python("llmc", root=tmp_path)
    with pytest.raises(RequantError, match="`make quark13-venv`"):
        env_python("quark13", root=tmp_path)
