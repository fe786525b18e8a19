"""The documentation's generated parts (docs/hooks.py): markers become tables from the recipes, the argument parser
and results/*.json; a missing results file or an unknown marker stops the build, naming what to run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page(name: str = "x.md"):
    return SimpleNamespace(file=SimpleNamespace(src_path=name))


def test_markers_become_generated_tables(hooks):
    from requant.recipe import builtin_names

    text = hooks.on_page_markdown("before\n<!-- requant:recipes -->\nafter\n<!-- requant:cli -->\n", _page(), None, None)
    assert "<!-- requant:" not in text and text.startswith("before\n") and "\nafter\n" in text
    for name in builtin_names():
        assert f"| `{name}` |" in text
    for command in ("convert", "verify", "bench", "serve", "mirror", "hub"):
        assert f"### `requant {command}`" in text
    assert "--quark-version" in text


def test_a_results_table_carries_its_date_and_machine(hooks, tmp_path, monkeypatch):
    from requant.bench.provenance import describe, run_info

    run = run_info()
    (tmp_path / "hardening.json").write_text(json.dumps(
        {"run": run, "scale": "ci", "areas": {"lease: race": {"tried": 5, "outcomes": {"one won": 5}, "lost": 0, "notes": []}}}))
    monkeypatch.setattr(hooks, "RESULTS_DIR", tmp_path)
    block = hooks.results_block("hardening")
    assert "| lease: race | 5 | one won: 5 | 0 |" in block
    assert describe(run) in block and "`results/hardening.json`, written by `make hardening`" in block


def test_a_missing_results_file_or_marker_stops_the_build(hooks, tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "RESULTS_DIR", tmp_path)
    with pytest.raises(hooks.GeneratedError, match=r"perf.md: results/layer.json: .*run `make bench-layer`"):
        hooks.on_page_markdown("<!-- requant:results:layer -->\n", _page("perf.md"), None, None)
    with pytest.raises(hooks.GeneratedError, match="unknown"):
        hooks.on_page_markdown("<!-- requant:results:nonsense -->\n", _page(), None, None)
    with pytest.raises(hooks.GeneratedError, match="unknown marker"):
        hooks.on_page_markdown("<!-- requant:tables -->\n", _page(), None, None)
