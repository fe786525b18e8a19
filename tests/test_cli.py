"""The command line's shape: one module per command, wired in requant.cli; ``requant bench``'s subcommands; the
pointers from the old benchmark spellings; and no library function outside requant/cli/ taking a Namespace."""

from __future__ import annotations

import argparse
import ast
import pkgutil
from pathlib import Path

import pytest

import requant
import requant.cli
from requant.cli import COMMANDS, build_parser, main

CLI_DIR = Path(requant.cli.__file__).parent


def _leaves(parser: argparse.ArgumentParser, prefix: str):
    """(command path, parser) of every parser that runs something: those without subcommands of their own."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, f"{prefix} {name}")


def test_every_command_module_is_wired_and_registers_runnable_commands():
    modules = {m.name for m in pkgutil.iter_modules([str(CLI_DIR)]) if not m.name.startswith("_")}  # _: helpers
    assert {c.__name__.rsplit(".", 1)[1] for c in COMMANDS} == modules
    for command in COMMANDS:
        parser = argparse.ArgumentParser(prog="requant")
        command.register(parser.add_subparsers(dest="command", required=True))
        leaves = list(_leaves(parser, "requant"))
        assert len(leaves) >= 1 and all(callable(p.get_default("run")) for _, p in leaves), command.__name__


def test_the_full_parser_lists_each_command_once():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(commands.choices) == ["synth", "plan", "convert", "mirror", "hub", "verify", "recipes", "bench", "serve",
                                      "smoke", "localize", "eval", "evaluate", "release", "engine-probe",
                                      "compare"]
    assert "requant bench serve" in {name for name, _ in _leaves(parser, "requant")}


def test_bench_help_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("conversion", "layer", "peers", "hub", "serve"):
        assert f"\n    {name} " in out, out


@pytest.mark.parametrize(("argv", "now"), [
    (["bench-serve", "--out", "results"], "requant bench serve"),
    (["bench", "--layer", "--experts", "16"], "requant bench layer"),
    (["bench", "--peers", "--experts", "16", "--out", "results"], "requant bench peers"),
    (["bench", "--hub"], "requant bench hub"),
    (["bench", "--out", "results"], "requant bench conversion"),
])
def test_old_benchmark_spellings_point_to_the_subcommand(capsys, argv, now):
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"`{now}`" in err[0], err


def test_convert_without_the_flow_is_one_line_and_status_2(capsys):
    assert main(["convert", "src", "dst", "--recipe", "kimi-k2.6-mxfp4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("requant convert: error: convert without --local"), err


def namespace_takers(source: str, filename: str = "<string>") -> list[str]:
    """Functions with a parameter annotated as a Namespace, or an unannotated ``args`` (not ``*args``) whose
    attributes the function reads (``args.out``): a parsed command line passed into the library."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        a = node.args
        for param in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
            annotation = ast.unparse(param.annotation) if param.annotation else ""
            read = param.arg == "args" and not annotation and any(
                isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "args"
                for n in ast.walk(node))
            if "Namespace" in annotation or read:
                found.append(f"{filename}:{node.lineno}: {getattr(node, 'name', 'lambda')}({param.arg})")
    return found


def test_no_library_function_outside_the_cli_takes_a_namespace():
    root = Path(requant.__file__).parent
    paths = [p for p in sorted(root.rglob("*.py")) if CLI_DIR not in p.parents]
    assert len(paths) > 40  # the walk saw the library
    found = [f for p in paths for f in namespace_takers(p.read_text(), str(p.relative_to(root.parent)))]
    assert found == []


@pytest.mark.parametrize("source", [
    "def run_bench(args):\n    return args.repeats\n",
    "import argparse\ndef f(opts: argparse.Namespace) -> None: ...\n",
    "from argparse import Namespace\nclass B:\n    async def g(self, *, o: 'Namespace'): ...\n",
    "f = lambda args: args.out\n",
])
def test_the_namespace_guard_sees_a_namespace_taker(source):
    assert namespace_takers(source) != []


@pytest.mark.parametrize("source", [
    "def f(out: str | None, *args, experts: int = 96, **kwargs):\n    return args.count(1)\n",
    "def git(args: tuple[str, ...]):\n    return args.index('-c')\n",
    "def prefix_of(self, args, kwargs):\n    return bind(self, *args, **kwargs)\n",
])
def test_the_namespace_guard_lets_plain_parameters_through(source):
    assert namespace_takers(source) == []
