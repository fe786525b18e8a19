"""Where a result file's figures come from: date, code revision, package versions and the machine."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "amd-quark", "compressed-tensors", "lm-eval", "transformers", "ray", "prefect")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root or Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_info(packages: tuple[str, ...] = PACKAGES) -> dict:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "python": platform.python_version(), "versions": versions, "cpu": cpu_model(),
            "cores": os.cpu_count() or 1}


def describe(info: dict) -> str:
    """One line for a table's caption."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    return (f"{info['date']}, requant {info.get('commit') or '?'}, {info['cpu']} ({info['cores']} cores), "
            f"Python {info['python']}, {versions}")


def write_results(out: str | Path | None, name: str, results: dict, text: str) -> None:
    """``NAME.json`` (the figures, with their provenance) and ``NAME.md`` (their table) into ``out``, if given."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (Path(out) / f"{name}.md").write_text(text)
