"""The ``requant`` command line: one module per command (or command group), wired here in one place.

Each command module has ``register(commands)``, which adds its parser and sets ``run`` on it, and ``run(args)``
functions, which turn the parsed arguments into plain typed parameters of library functions; nothing outside
this package takes an ``argparse.Namespace``. :func:`build_parser` is the whole parser (the docs render the command
reference from it); :func:`main` runs one command. Errors a user can fix print as one line and exit with status 2.

The library imports no orchestration: ``convert`` without ``--local`` runs the requantize flow through the
``convert_flow`` callable that the ``requant`` console script (``requant.flows.cli``) passes in.
"""

from __future__ import annotations

import argparse
import sys

from requant.cli import (
    bench,
    compare,
    convert,
    engine_probe,
    evaluate,
    evaluate_checkpoint,
    hub,
    localize,
    mirror,
    plan,
    recipes,
    release,
    serve,
    smoke,
    synth,
    verify,
)
from requant.cli.convert import ConvertFlow
from requant.errors import ProblemsError, RequantError

# The commands in the order ``requant --help`` lists them.
COMMANDS = (synth, plan, convert, mirror, hub, verify, recipes, bench, serve, smoke, localize, evaluate, evaluate_checkpoint,
            release, engine_probe, compare)

__all__ = ["COMMANDS", "ConvertFlow", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``requant`` parser with every command of :data:`COMMANDS`; each parsed command carries its ``run``."""
    parser = argparse.ArgumentParser(prog="requant", description="Re-quantize Kimi-K2.6-family MoE checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None, convert_flow: ConvertFlow | None = None) -> int:
    """Run one command; ``convert_flow`` runs ``convert`` without ``--local`` (see requant.flows.cli)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    moved = bench.renamed(argv)
    if moved:
        print(f"requant: error: that benchmark is now `requant {moved}` (see requant bench --help)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        if args.run is convert.run:  # the one command that runs the caller's flow
            return convert.run(args, convert_flow)
        return args.run(args)
    except ProblemsError as exc:
        print(f"requant {args.command}: error: {exc}", file=sys.stderr)
        for problem in exc.problems[1:]:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except RequantError as exc:
        print(f"requant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a failure the library did not name more precisely: still one line, status 2
        from requant.errors import os_failure

        print(f"requant {args.command}: error: {os_failure('?', exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"requant {args.command}: interrupted", file=sys.stderr)
        return 130
