"""Secrets and trust, statically and at the edges: no unpickling of checkpoint data, no upstream remote code,
no trust_remote_code outside the opt-in engine flag, object names validated against path traversal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from requant.errors import RequantError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("requant", "flows", "tasks", "dev") for p in (ROOT / d).rglob("*.py"))
FORBIDDEN_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("dill", "load"), ("joblib", "load"),
                   ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "loads")}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield (f.value.id, f.attr), node
            elif isinstance(f, ast.Name):
                yield (None, f.id), node


def test_no_unpickling_exec_or_remote_code(ledger):
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for (owner, name), node in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if (owner, name) in FORBIDDEN_CALLS:
                problems.append(f"{where}: {owner}.{name}")
            if owner is None and name in ("exec", "eval", "__import__"):
                problems.append(f"{where}: {name}()")
            if owner == "np" and name == "load" and any(k.arg == "allow_pickle" for k in node.keywords):
                problems.append(f"{where}: np.load(allow_pickle)")
            for kw in node.keywords:
                # engines.py passes its own opt-in flag for external engines (never to transformers/HF loaders);
                # anywhere else only the literal False (SGLang's decider refuses the checkpoint's code) is allowed
                refused = isinstance(kw.value, ast.Constant) and kw.value.value is False
                if kw.arg == "trust_remote_code" and path.name != "engines.py" and not refused:
                    problems.append(f"{where}: trust_remote_code=")
        ledger.record("trust: static scan of sources", "clean" if not problems else "finding")
    assert problems == []


def test_trust_remote_code_only_as_the_opt_in_engine_flag():
    def mentions(path: Path) -> bool:  # "trust_remote_code=False" refuses remote code: not an opt-in
        text = path.read_text().replace("trust_remote_code=False", "")
        return "trust-remote-code" in text or "trust_remote_code" in text

    hits = sorted(str(p.relative_to(ROOT)) for p in [*SOURCES, *(ROOT / "requant").rglob("*.yaml"), ROOT / "prefect.yaml"]
                  if mentions(p))
    # the model card prints each engine's command line for its readers (Kimi's configuration is remote code, so the
    # engines need their flag); requant itself never runs it
    assert hits == ["requant/card/serving.py", "requant/engines/engines.py", "requant/engines/engines.yaml"]


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", "ok/../../../x"])
def test_materialize_refuses_names_outside_the_target(name, tmp_path, monkeypatch, ledger):
    """Engines that need local files get a copy; object names from the store must not escape the copy."""
    from requant.engines import engines

    class Store:
        uri = "s3://bucket/ckpt"

        def list_files(self):
            return ["config.json", name]

        def size(self, path):
            return 1

        def copy_file_to(self, path, dst):
            dst.write_bytes(b"x")

    monkeypatch.setattr("requant.io.storage.open_storage", lambda uri: Store())
    with pytest.raises(RequantError, match="outside"):
        engines.materialize("s3://bucket/ckpt", tmp_path / "copy")
    assert not (tmp_path / "escape.txt").exists()
    ledger.record("trust: path traversal in object names", "refused")


@pytest.mark.parametrize("name", ["../evil.txt", "sub/../../evil.txt", "/abs.txt"])
def test_planner_refuses_upstream_file_names_outside_the_checkpoint(name, tiny_upstream, ledger):
    """An object store can list keys like '<prefix>/../x'; copying such a 'file' would write outside the output."""
    from requant.errors import PlanError
    from requant.io.storage import LocalDir
    from requant.planning import build_plan
    from requant.recipe import load_recipe

    class Listing(LocalDir):
        def list_files(self):
            return [*super().list_files(), name]

    with pytest.raises(PlanError, match="outside the checkpoint"):
        build_plan(Listing(tiny_upstream), load_recipe("kimi-k2.6-mxfp4"))
    ledger.record("trust: path traversal in object names", "refused")
