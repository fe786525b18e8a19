"""The public API: ``import requant; requant.convert(...)`` as the docs show it, the same bytes as the CLI, typed
options and results, and names imported on first use (``import requant.errors`` does not import torch)."""

from __future__ import annotations

import dataclasses
import filecmp
import subprocess
import sys

import pytest

import requant
from requant.cli import main


def test_all_names_the_api_and_each_resolves():
    assert set(requant.__all__) >= {"convert", "verify", "evaluate", "load_recipe", "plan", "open_storage",
                                    "ConvertOptions", "ConvertSummary", "EvalOptions"}
    for name in requant.__all__:
        assert getattr(requant, name) is getattr(__import__("requant.api", fromlist=[name]), name)
    assert callable(requant.plan) and callable(requant.verify)  # functions, not the modules of those names
    with pytest.raises(AttributeError):
        requant.no_such_thing  # noqa: B018


def test_importing_a_light_module_does_not_import_torch():
    code = "import sys, requant.errors, requant.settings; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_convert_plan_verify_as_documented(tiny_upstream, tmp_path):
    """The API's conversion is the CLI's: the same files, byte for byte, and a typed summary."""
    summary = requant.convert(str(tiny_upstream), str(tmp_path / "api"), "kimi-k2.6-mxfp4", progress=False)
    assert isinstance(summary, requant.ConvertSummary)
    plan = requant.plan(str(tiny_upstream), "kimi-k2.6-mxfp4")
    assert summary.jobs == len(plan.jobs) and summary.resumed == 0 and not summary.reused
    assert summary.tensors == len(summary.manifest["tensors"]) == sum(len(j.specs) for j in plan.jobs)
    assert summary.run_key == summary.manifest["upstream"]["run_key"]
    assert requant.verify(summary.output).tensors == summary.tensors
    assert main(["convert", str(tiny_upstream), str(tmp_path / "cli"), "--recipe", "kimi-k2.6-mxfp4", "--local"]) == 0
    api_files = sorted(p.name for p in (tmp_path / "api").iterdir())
    assert api_files == sorted(p.name for p in (tmp_path / "cli").iterdir())
    differ = [f for f in api_files if f != "requant-manifest.json"
              and not filecmp.cmp(tmp_path / "api" / f, tmp_path / "cli" / f, shallow=False)]
    assert differ == []  # the manifest differs only in its creation time


def test_options_are_typed_and_frozen(tiny_upstream, tmp_path):
    options = requant.ConvertOptions(progress=False, jobs=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.jobs = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="either options= or keyword options"):
        requant.convert(str(tiny_upstream), str(tmp_path / "x"), options=options, progress=False)
    with pytest.raises(TypeError):
        requant.convert(str(tiny_upstream), str(tmp_path / "x"), no_such_option=True)
    summary = requant.convert(str(tiny_upstream), str(tmp_path / "x"), options=options)
    again = requant.convert(str(tiny_upstream), str(tmp_path / "x"), options=dataclasses.replace(options, overwrite=True))
    assert summary.run_key == again.run_key and again.tensors == summary.tensors
