"""The library (requant/, the core package directory) imports nothing from the orchestration side (flows/ and
tasks/, installed as requant.flows and requant.tasks, and dev) nor Prefect or Ray, not even inside a function: it runs
where they are not installed (a bare GPU node, a user's script), and the flows depend on it, not the other way round.
No module imports flows/ or tasks/ by their directory names `flows` and `tasks`: those would be second copies of the
same files under other names (two Prefect flows of one name), and names the distribution does not install. And the
product imports nothing of requant.testing, the test and demo infrastructure, except where a command runs one of its
components."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

import requant

# flows/ and tasks/ sit at the top of the repository and install as requant.flows and requant.tasks (pyproject's
# package-dir); the bare names are forbidden everywhere (test_nothing_imports_flows_or_tasks_by_the_bare_names)
ORCHESTRATION = {"requant.flows": "flows", "requant.tasks": "tasks"}
BARE = ("flows", "tasks")
FORBIDDEN = (*ORCHESTRATION, *BARE, "dev", "prefect", "prefect_ray", "ray")
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
    root = Path(requant.__file__).parent         # the core package directory (flows/ and tasks/ are beside it)
    found = []
    for path in sorted(root.rglob("*.py")):
        for line, module in _imports(ast.parse(path.read_text(), str(path))):
            if _is_within(module, FORBIDDEN):
                found.append(f"{path.relative_to(root.parent)}:{line}: {module}")
    assert len(list(root.rglob("*.py"))) > 40     # the walk saw the library
    assert found == []


def test_the_check_sees_a_lazy_import(tmp_path):
    tree = ast.parse("def f():\n    from requant.flows.requantize import requantize\n    importlib.import_module('ray')\n"
                     "    from requant import tasks\n")
    modules = [m for _, m in _imports(tree)]
    assert sorted(modules) == ["ray", "requant.flows.requantize.requantize", "requant.tasks"]
    assert all(_is_within(m, FORBIDDEN) for m in modules)
    assert not _is_within("requant.flowsheet", FORBIDDEN) and not _is_within("requant.task", FORBIDDEN)


def _is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# A module named by a string: `python -m flows.cli`, an entrypoint `flows.requantize:requantize`
_MODULE_STRING = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.\w+)+)(?::\w+)?")


def _bare_references(path: Path, relative: str) -> list[str]:
    """``relative``'s imports of ``flows`` or ``tasks`` as top-level names, and string constants that name such a
    module (``"flows.cli"``, ``"flows.requantize:requantize"``), each as ``FILE:LINE: MODULE``."""
    tree = ast.parse(path.read_text(), str(path))
    found = [f"{relative}:{line}: {module}" for line, module in _imports(tree) if _is_within(module, BARE)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.fullmatch(node.value)
            if match and _is_within(match["module"], BARE):
                found.append(f"{relative}:{node.lineno}: {node.value}")
    return sorted(set(found))            # import_module('flows.x') is both an import and a string


def test_nothing_imports_flows_or_tasks_by_the_bare_names():
    """Every module of requant/, flows/, tasks/, dev/, infra/ and tests/, and prefect.yaml's entrypoints, name the
    orchestration requant.flows and requant.tasks. From the repository root `import flows.requantize` would still
    work (the directory is on sys.path) and load a second copy of the module; installed, it fails."""
    root = Path(requant.__file__).parent.parent
    paths = [p for d in ("requant", "flows", "tasks", "dev", "infra", "tests") for p in sorted((root / d).rglob("*.py"))]
    found = [f for p in paths for f in _bare_references(p, p.relative_to(root).as_posix())]
    assert len(paths) > 150 and found == []
    deployments = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    assert [d["entrypoint"] for d in deployments if not d["entrypoint"].startswith("requant.flows.")] == []


@pytest.mark.parametrize("source", ["from flows.requantize import requantize\n", "import tasks.convert\n",
                                    "def f():\n    from tasks import convert\n",
                                    "importlib.import_module('flows.watch')\n",
                                    "cmd = [sys.executable, '-m', 'flows.cli']\n",
                                    "entry = 'flows.requantize:requantize'\n"])
def test_the_bare_name_check_sees_a_planted_reference(tmp_path, source):
    planted = tmp_path / "m.py"
    planted.write_text(source)
    assert len(_bare_references(planted, "tests/m.py")) == 1
    planted.write_text(source.replace("flows", "requant.flows").replace("tasks", "requant.tasks"))
    assert _bare_references(planted, "tests/m.py") == []


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
# the module name each repository directory's files import as, requant.flows and requant.tasks before requant
PACKAGES = {**ORCHESTRATION, "requant": "requant", "dev": "dev", "infra": "infra"}


def _path_of(module: str) -> Path | None:
    """Where repository module ``module`` would be (less the ``.py``), or None when it is not under one of ours."""
    for prefix, directory in PACKAGES.items():
        if _is_within(module, (prefix,)):
            return ROOT.joinpath(directory, *module.split(".")[prefix.count(".") + 1:])
    return None


def _module_of(name: str) -> str | None:
    """The repository module ``name`` is, or None when it is not one of ours (a package's ``__init__`` counts)."""
    parts = name.split(".")
    while parts and (path := _path_of(".".join(parts))) is not None:
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def _import_graph() -> dict[str, set[str]]:
    """Every repository module and the repository modules it imports, at module level or inside a function
    (``from a import b`` names the submodule ``a.b`` where there is one)."""
    graph: dict[str, set[str]] = {}
    for prefix, directory in PACKAGES.items():
        for path in sorted((ROOT / directory).rglob("*.py")):
            rel = path.relative_to(ROOT / directory).with_suffix("")
            module = ".".join([prefix, *(rel.parts[:-1] if rel.name == "__init__" else rel.parts)])
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
    assert len(graph) > 100 and "requant.tasks.convert" in graph["requant.flows.requantize"]
    assert "requant.run.execute" in graph
    assert _cycles(graph) == []


def test_the_circle_check_sees_a_lazy_circle():
    graph = {"dev.a": {"dev.b"}, "dev.b": {"dev.c"}, "dev.c": {"dev.a"}, "dev.d": {"dev.a"}}
    assert _cycles(graph) == [["dev.a", "dev.b", "dev.c"]]
