"""Where a result file's figures come from: date, code revision, the source paths measured, package versions and the
machine.

Each benchmark declares the repository paths (files, folders or git pathspec globs) whose code its figures measure;
``run_info(measures=...)`` records them with the commit and any uncommitted changes to them, and the docs build
(docs/hooks.py) marks a figure whose measured paths changed after that commit.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "amd-quark", "compressed-tensors", "lm-eval", "transformers", "ray", "prefect")
ROOT = Path(__file__).resolve().parents[2]

# What every conversion figure measures: the layer job, its kernels and formats, the plan and recipes, storage.
CONVERSION = ("requant/job.py", "requant/formats", "requant/planning.py", "requant/layout.py", "requant/recipe.py",
              "requant/recipes", "requant/run", "requant/api.py", "requant/assemble.py", "requant/manifest.py",
              "requant/export", "requant/io", "requant/testing/synth.py")
# What every figure of the requantize flow measures, beyond the conversion: the flow, its tasks, S3, verify.
FLOW = ("flows/requantize.py", "flows/runtime.py", "tasks/convert.py", "requant/verification.py", "requant/lease.py",
        "requant/testing/seaweed.py", "requant/bench/cpu.py")
# What every serving figure measures: the reference server and the engines' launchers.
SERVING = ("requant/serving", "requant/engines/engines.py", "requant/engines/engines.yaml")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


GIT = "git"


class UnknownAge(Exception):
    """Why this copy cannot tell whether a figure's measured code changed since (no git, no checkout, no commit)."""


def _git_run(args: tuple[str, ...], root: Path) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([GIT, "-c", "core.quotepath=off", *args], cwd=root, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git(*args: str, root: Path | None = None) -> str | None:
    """git's output in ``root``'s checkout; None where git fails, or is missing, or ``root`` is no checkout's top."""
    root = root or ROOT
    top = _git_run(("rev-parse", "--show-toplevel"), root)
    if top is None or top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
        return None
    out = _git_run(args, root)
    return out.stdout if out is not None and out.returncode == 0 else None


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's HEAD, in full (``describe`` shortens it)."""
    return (_git("rev-parse", "HEAD", root=root) or "").strip() or None


def changed_since(commit: str, measures: list[str], root: Path | None = None) -> list[str]:
    """The files under ``measures`` (repository paths or pathspec globs) that differ between ``commit`` and HEAD.

    Raises UnknownAge where that cannot be told: no git, no checkout (a source tarball), or a commit this checkout
    does not hold (a shallow clone)."""
    root = root or ROOT
    if _git_run(("--version",), root) is None:
        raise UnknownAge("git is not available here")
    if _git("rev-parse", "HEAD", root=root) is None:
        raise UnknownAge(f"{root} is not a git checkout")
    if _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", root=root) is None:
        raise UnknownAge(f"commit {commit[:7]} is not in this checkout's history")
    diff = _git("diff", "--name-only", commit, "HEAD", "--", *measures, root=root)
    if diff is None:
        raise UnknownAge(f"git diff {commit[:7]} HEAD failed")
    return diff.splitlines()


def source_info(measures: tuple[str, ...], root: Path | None = None) -> dict:
    """The commit, the measured paths and those of their files that differ from it (uncommitted) at measuring time;
    commit and dirty are None outside a git checkout (a bare device machine)."""
    commit = git_commit(root)
    dirty = None
    if commit and measures:
        status = _git("status", "--porcelain", "--untracked-files=all", "--", *measures, root=root)
        dirty = sorted(line[3:] for line in status.splitlines()) if status is not None else None
    return {"commit": commit, "measures": list(measures), "dirty": dirty}


def run_info(packages: tuple[str, ...] = PACKAGES, measures: tuple[str, ...] = ()) -> dict:
    """Date, machine and versions, and (``source_info``) the code revision of the paths ``measures`` names."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), **source_info(measures),
            "python": platform.python_version(), "versions": versions, "cpu": cpu_model(),
            "cores": os.cpu_count() or 1}


def describe(info: dict) -> str:
    """One line for a table's caption."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    commit = (info.get("commit") or "?")[:7] + (" with uncommitted changes" if info.get("dirty") else "")
    return (f"{info['date']}, requant {commit}, {info['cpu']} ({info['cores']} cores), "
            f"Python {info['python']}, {versions}")


def write_results(out: str | Path | None, name: str, results: dict, text: str) -> None:
    """``NAME.json`` (the figures, with their provenance) and ``NAME.md`` (their table) into ``out``, if given."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (Path(out) / f"{name}.md").write_text(text)
