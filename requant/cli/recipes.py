"""``requant recipes``: the built-in recipes, as a table or JSON."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("recipes", help="list the built-in recipes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.formats.table import UNQUANTIZED
    from requant.recipe import builtin_names, load_recipe

    recipes = [load_recipe(n) for n in builtin_names()]
    if args.json:
        print(json.dumps([{"name": r.name, "format": r.format, "export": r.export, "targets": dict(r.targets),
                           "overrides": [list(o) for o in r.overrides]} for r in recipes], indent=2))
        return 0
    for r in recipes:
        quantized = [c if t == r.format else f"{c} ({t})" for c, t in r.targets if t != UNQUANTIZED]
        print(f"{r.name:28s} {r.export:19s} {r.format:16s} quantizes: {', '.join(quantized) or 'nothing'}")
    return 0
