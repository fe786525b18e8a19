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


def _git(root: Path, *args: str) -> str:
    import subprocess

    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A checkout with a kernel and a job module, committed; its HEAD is what the figures were measured at."""
    root = tmp_path / "repo"
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "mxfp4.py").write_text("FAST = True\n")
    (root / "job.py").write_text("JOBS = 1\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "measured here")
    return root


def _hardening(run: dict) -> dict:
    return {"run": run, "scale": "ci", "areas": {"lease: race": {"tried": 5, "outcomes": {"one won": 5}, "lost": 0,
                                                                "notes": []}}}


def test_a_figure_whose_measured_code_changed_since_its_commit_is_marked_stale(hooks, repo, tmp_path, monkeypatch):
    from requant.bench import provenance

    monkeypatch.setattr(provenance, "ROOT", repo)
    kernel_run = provenance.run_info(measures=("kernels",))
    job_run = {**kernel_run, "measures": ["job.py"]}
    assert kernel_run["commit"] == _git(repo, "rev-parse", "HEAD") and kernel_run["dirty"] == []
    assert hooks.age_mark(kernel_run, "make bench") == "" and hooks.age_mark(job_run, "make bench") == ""

    (repo / "kernels" / "mxfp4.py").write_text("FAST = False\n")
    _git(repo, "commit", "-q", "-am", "slower kernel")
    mark = hooks.age_mark(kernel_run, "make bench")
    assert mark.startswith('!!! warning "Figures that may be stale"')
    assert f"Measured at `{kernel_run['commit'][:7]}` on {kernel_run['date']}" in mark
    assert "since then `kernels/mxfp4.py` changed. Run `make bench`" in mark
    assert hooks.age_mark(job_run, "make bench") == ""  # job.py did not change: its figures stay unmarked

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "hardening.json").write_text(json.dumps(_hardening(kernel_run)))
    monkeypatch.setattr(hooks, "RESULTS_DIR", tmp_path / "results")
    page = hooks.on_page_markdown("<!-- requant:results:hardening -->\n", _page(), None, None)
    assert page.index("may be stale") < page.index("| lease: race |")


def test_a_figure_measured_on_uncommitted_changes_says_so(hooks, repo):
    from requant.bench.provenance import source_info

    (repo / "job.py").write_text("JOBS = 2\n")
    run = {"date": "2026-12-04 10:00 UTC", **source_info(("job.py", "kernels"), repo)}
    assert run["dirty"] == ["job.py"]
    assert "measured with uncommitted changes to `job.py`" in hooks.age_mark(run, "make bench", repo)


def test_a_figure_without_its_paths_or_commit_is_marked_and_no_git_is_said(hooks, repo, tmp_path, monkeypatch):
    from requant.bench import provenance

    commit = _git(repo, "rev-parse", "HEAD")
    run = {"date": "2026-12-03 18:11 UTC", "commit": commit, "measures": ["kernels"]}
    assert "records no source paths" in hooks.age_mark({**run, "measures": None}, "make bench", repo)
    assert "Figures of unknown age" in hooks.age_mark({**run, "commit": None}, "make bench", repo)
    assert "commit 0000000 is not in this checkout's history" in hooks.age_mark(
        {**run, "commit": "0" * 40}, "make bench", repo)
    tarball = tmp_path / "tarball"
    tarball.mkdir()
    assert f"{tarball} is not a git checkout" in hooks.age_mark(run, "make bench", tarball)
    assert provenance.source_info(("kernels",), tarball) == {"commit": None, "measures": ["kernels"], "dirty": None}
    monkeypatch.setattr(provenance, "GIT", str(tmp_path / "no-git"))
    mark = hooks.age_mark(run, "make bench", repo)
    assert mark.startswith('!!! note "Age unknown here"') and "git is not available here" in mark


def test_every_results_writer_declares_paths_that_exist(hooks):
    import importlib

    from requant.bench.provenance import ROOT as PROVENANCE_ROOT

    assert PROVENANCE_ROOT == ROOT
    writers = [importlib.import_module(m).MEASURES for m in (
        "requant.bench.conversion", "requant.bench.peers", "requant.bench.layer", "requant.bench.hub",
        "requant.bench.serve", "dev.bench", "dev.measure_trained", "dev.measure_global_scales")]
    writers += [hooks._renderer(f"{path}:MEASURES") for path in ("tests/hardening/report.py", "infra/device_check.py")]
    for measures in writers:
        assert measures and not [p for p in measures if not next(iter(ROOT.glob(p)), None)]


def test_the_settings_table_lists_every_variable_with_its_default(hooks):
    from requant import settings

    text = hooks.on_page_markdown("<!-- requant:settings -->\n", _page(), None, None)
    for setting in settings.ALL:
        assert f"| `{setting.name}` | {setting.expected} | {setting.default_label()} |" in text
    assert "| `REQUANT_LEASE_TTL_SECONDS` | a number of seconds, more than 0 | `120` |" in text
    assert "#### Read by the test suite only" in text


def test_the_api_page_documents_exactly_requant_all(hooks, monkeypatch):
    import sys
    from types import ModuleType

    def render(all_names: list[str] | None, **attributes) -> str:
        stand_in = ModuleType("requant")  # what the hook imports, with only the given names
        stand_in.__dict__.update(attributes)
        if all_names is not None:
            stand_in.__all__ = all_names
        monkeypatch.setitem(sys.modules, "requant", stand_in)
        return hooks.on_page_markdown("<!-- requant:api -->\n", _page("api.md"), None, None)

    assert render(["convert", "Plan"], convert=len, Plan=dict) == "::: requant\n    options:\n      members: [convert, Plan]\n\n"
    assert "No public API declared yet" in render(None)
    with pytest.raises(hooks.GeneratedError, match="api.md: requant.__all__ names 'plan', which requant does not"):
        render(["convert", "plan"], convert=len)
