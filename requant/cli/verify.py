"""``requant verify``: an output checkpoint checked against its manifest."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("verify", help="check an output checkpoint against its manifest")
    p.add_argument("path")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import requant

    summary = requant.verify(args.path)
    print(f"ok: {args.path}: {summary.tensors} tensors, {summary.files} files, "
          f"{summary.upstream_tensors} upstream tensors accounted for")
    return 0
