"""The library (requant/) imports nothing from the orchestration side (flows, tasks, dev) nor Prefect or Ray, not
even inside a function: it runs where they are not installed (a bare GPU node, a user's script), and the flows
depend on it, not the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import requant

FORBIDDEN = {"flows", "tasks", "dev", "prefect", "prefect_ray", "ray"}


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in {"import_module", "__import__"} and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, str(node.args[0].value)


def test_the_library_imports_no_orchestration_even_lazily():
    root = Path(requant.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for line, module in _imports(ast.parse(path.read_text(), str(path))):
            if module.split(".")[0] in FORBIDDEN:
                found.append(f"{path.relative_to(root.parent)}:{line}: {module}")
    assert len(list(root.rglob("*.py"))) > 40     # the walk saw the library
    assert found == []


def test_the_check_sees_a_lazy_import(tmp_path):
    tree = ast.parse("def f():\n    from flows.requantize import requantize\n    importlib.import_module('ray')\n")
    assert [m for _, m in _imports(tree)] == ["flows.requantize", "ray"]
