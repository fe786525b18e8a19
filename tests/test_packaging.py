"""The distribution installs one top-level name, requant: the core package and, through pyproject's package-dir,
the repository's flows/ and tasks/ as requant.flows and requant.tasks. `flows` and `tasks` in site-packages would be
names any other project can hold."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import requant

ROOT = Path(requant.__file__).parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _packages_in_the_tree() -> set[str]:
    """Every package directory (with an ``__init__.py``) under requant/ and the package-dir mappings, by the name
    it installs as."""
    found = set()
    for name, directory in {"requant": "requant", **SETUPTOOLS["package-dir"]}.items():
        for init in (ROOT / directory).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / directory).parts]))
    return found


def test_the_distribution_installs_requant_alone():
    assert SETUPTOOLS["package-dir"] == {"requant.flows": "flows", "requant.tasks": "tasks"}
    assert sorted(SETUPTOOLS["packages"]) == sorted(_packages_in_the_tree())  # a new package is listed too
    assert {name.split(".")[0] for name in SETUPTOOLS["packages"]} == {"requant"}
    assert set(SETUPTOOLS["package-data"]) <= set(SETUPTOOLS["packages"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"requant": "requant.flows.cli:main"}


def test_requant_flows_and_tasks_are_the_repository_directories_from_anywhere(tmp_path):
    """The editable install (make install) maps requant.flows to flows/ whether requant itself is found from the
    repository root (sys.path[0]) or through the install; the bare names are not installed."""
    code = ("import importlib.util as u, sys; import requant.flows, requant.tasks; "
            "print(requant.flows.__file__, requant.tasks.__file__, u.find_spec('requant.tasks.convert').origin, "
            "u.find_spec('flows'), u.find_spec('tasks'))")
    for cwd in (ROOT, tmp_path):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True,
                             timeout=120).stdout.split()
        expected = [ROOT / "flows/__init__.py", ROOT / "tasks/__init__.py", ROOT / "tasks/convert.py"]
        assert [Path(p) for p in out[:3]] == expected, cwd
        # from the repository root the directories themselves are on sys.path, so only elsewhere are they absent
        assert cwd == ROOT or out[3:] == ["None", "None"], (cwd, out)
