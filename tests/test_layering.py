"""The library (requant/) imports nothing from the orchestration side (flows, tasks, dev) nor Prefect or Ray, not
even inside a function: it runs where they are not installed (a bare GPU node, a user's script), and the flows
depend on it, not the other way round. And the product imports nothing of requant.testing, the test and demo
infrastructure, except where a command runs one of its components."""

from __future__ import annotations

import ast
from pathlib import Path

import requant

FORBIDDEN = {"flows", "tasks", "dev", "prefect", "prefect_ray", "ray"}
TESTING = "requant.testing"
NOT_PRODUCT = ("requant/testing/", "requant/bench/")  # the test and demo package; the benchmarks use it
# `requant hub` and `requant synth` run a test and demo component; the CLI imports just that one, inside the command
CLI_RUNS = ("requant.testing.hubserver", "requant.testing.synth")


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:  # `from requant import testing` imports requant.testing
                yield node.lineno, f"{node.module}.{alias.name}"
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
    assert [m for _, m in _imports(tree)] == ["flows.requantize.requantize", "ray"]


def _is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _testing_imports(path: Path, relative: str) -> list[str]:
    """``relative``'s imports of requant.testing, each as ``FILE:LINE: MODULE``, but for the command modules' lazy
    imports of CLI_RUNS."""
    tree = ast.parse(path.read_text(), str(path))
    functions = [(node.lineno, node.end_lineno) for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    cli = relative == "requant/cli.py" or relative.startswith("requant/cli/")
    found = []
    for line, module in _imports(tree):
        if not _is_within(module, (TESTING,)):
            continue
        lazy = any(start <= line <= end for start, end in functions)
        if not (cli and lazy and _is_within(module, CLI_RUNS)):
            found.append(f"{relative}:{line}: {module}")
    return found


def test_the_product_imports_no_test_infrastructure_even_lazily():
    """requant/ (but testing/ and bench/), flows/ and tasks/: the product runs without the test and demo package
    (it finds the trained model's task by path, gsm8k.TRAINED_TASK_DIR)."""
    repo = Path(requant.__file__).parent.parent
    paths = [p for package in ("requant", "flows", "tasks") for p in sorted((repo / package).rglob("*.py"))]
    found = []
    for path in paths:
        relative = path.relative_to(repo).as_posix()
        if not relative.startswith(NOT_PRODUCT):
            found.extend(_testing_imports(path, relative))
    assert len(paths) > 40
    assert found == []


def test_the_testing_check_sees_imports_and_spares_only_the_commands(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from requant import testing\nimport requant.testing.seaweed\n"
                      "def hub():\n    from requant.testing import hubserver\n"
                      "    from requant.testing.synth import synthesize\n"
                      "    from requant.testing.trained import ASSETS\n")
    product = ["1: requant.testing", "2: requant.testing.seaweed", "4: requant.testing.hubserver",
               "5: requant.testing.synth.synthesize", "6: requant.testing.trained.ASSETS"]
    assert _testing_imports(source, "requant/evaluation/m.py") == [f"requant/evaluation/m.py:{f}" for f in product]
    cli = [f"requant/cli/hub.py:{f}" for f in product if "hubserver" not in f and "synth" not in f]
    assert _testing_imports(source, "requant/cli/hub.py") == cli  # lazy hubserver and synth: the commands'


def test_the_product_finds_the_trained_task_where_the_testing_package_keeps_it():
    from requant.evaluation.gsm8k import TRAINED_TASK_DIR
    from requant.testing.trained import ASSETS

    assert TRAINED_TASK_DIR == ASSETS
    assert (TRAINED_TASK_DIR / "test.jsonl").is_file()


ROOT = Path(requant.__file__).parent.parent
PACKAGES = ("requant", "flows", "tasks", "dev", "infra")


def _module_of(name: str) -> str | None:
    """The repository module ``name`` is, or None when it is not one of ours (a package's ``__init__`` counts)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    parts = name.split(".")
    while parts:
        path = ROOT.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def _import_graph() -> dict[str, set[str]]:
    """Every repository module and the repository modules it imports, at module level or inside a function
    (``from a import b`` names the submodule ``a.b`` where there is one)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            tree = ast.parse(path.read_text(), str(path))
            targets: set[str] = set()
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [f"{node.module}.{a.name}" for a in node.names] or [node.module]
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                      == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
                    names = [str(node.args[0].value)]
                for name in names:
                    target = _module_of(name)
                    if target and target != module:
                        targets.add(target)
            graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_anywhere_in_the_repository():
    """No two modules of requant/, flows/, tasks/, dev/ or infra/ import each other, directly or around a loop, not
    even inside a function: each layer can be read (and changed) knowing only the ones below it."""
    graph = _import_graph()
    assert len(graph) > 100 and "flows.requantize" in graph and "requant.run.execute" in graph
    assert _cycles(graph) == []


def test_the_circle_check_sees_a_lazy_circle():
    graph = {"flows.a": {"flows.b"}, "flows.b": {"flows.c"}, "flows.c": {"flows.a"}, "flows.d": {"flows.a"}}
    assert _cycles(graph) == [["flows.a", "flows.b", "flows.c"]]
