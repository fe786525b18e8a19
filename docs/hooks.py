"""MkDocs hooks: the pages' generated parts, so that they cannot drift from the code or the measurements.

A line ``<!-- requant:NAME -->`` in a page is replaced at build time by:

- ``recipes``: the built-in recipes, read from ``requant/recipes/*.yaml`` through requant's own recipe loader;
- ``cli``: ``requant --help`` and every subcommand's help, from the argument parser itself;
- ``settings``: every ``REQUANT_*`` environment variable, from its declaration in ``requant/settings.py``;
- ``api``: the public Python API, ``requant.__all__``, as mkdocstrings' ``:::`` blocks (rendered by that plugin);
- ``results:NAME``: the table of ``results/NAME.json`` (``trained``: ``results/trained/results.json``), rendered by
  the same code that printed it when the command ran, with the date, code revision, versions and machine it
  records. A figure whose measured code changed after the commit it records (the source paths its benchmark
  declares, compared with git against HEAD), or that was measured on uncommitted changes, or whose file records no
  commit or no paths, gets a warning above it naming what changed; where git cannot tell (a source tarball), a note
  says so.

An unknown marker, or a results file that is missing or unreadable, stops the build: no page shows a figure
that no command wrote.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"

MARKER = re.compile(r"^<!-- requant:([a-z0-9:-]+) -->$", re.MULTILINE)

# results/NAME -> (file under results/, command that writes it, renderer)
RESULTS = {
    "bench": ("bench.json", "make bench", "requant.bench.conversion:render"),
    "bench-targets": ("bench.json", "make bench", "requant.bench.conversion:render_targets"),
    "peers": ("peers.json", "make bench-peers", "requant.bench.peers:render"),
    "layer": ("layer.json", "make bench-layer", "requant.bench.layer:render"),
    "cluster": ("cluster.json", "make bench-cluster", "requant.bench.cluster:render"),
    "flow": ("flow.json", "make bench-flow", "dev.bench:render"),
    "serve": ("serve.json", "make bench-serve", "requant.bench.serve:format_results"),
    "hub": ("hub.json", "make bench-hub", "requant.bench.hub:render"),
    "release": ("release.json", "make bench-release", "requant.bench.release:render"),
    "device-check": ("device-check.json", "make device-check", "infra/device_check.py:table"),
    "trained": ("trained/results.json", "make measure-trained", "dev.measure_trained:table"),
    "global-scales": ("trained/global-scales.json", "make measure-global-scales", "dev.measure_global_scales:render"),
    "gate-simulation": ("gate-simulation.json", "make gate-simulation", "dev.gate_simulation:table"),
    "hardening": ("hardening.json", "make hardening", "tests/hardening/report.py:table"),
}


class GeneratedError(PluginError):
    """Stops the build with one line (mkdocs prints ``Error: ...``)."""


def _renderer(spec: str):
    module, name = spec.split(":")
    if str(ROOT) not in sys.path:  # dev/ renders its own results (MkDocs restores sys.path after loading hooks)
        sys.path.insert(0, str(ROOT))
    if module.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(module).stem, ROOT / module)
        mod = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    return getattr(mod, name)


def _demote(text: str) -> str:
    """The renderers' own headings become a level below the page's sections."""
    return re.sub(r"^#{1,3} ", "#### ", text, flags=re.MULTILINE)


def _files(paths: list[str], most: int = 4) -> str:
    named = ", ".join(f"`{p}`" for p in paths[:most])
    return named + (f" and {len(paths) - most} more" if len(paths) > most else "")


def age_mark(run: dict, command: str, root: Path | None = None) -> str:
    """An admonition above a figure whose code may have changed since it was measured; empty where it did not."""
    from requant.bench.provenance import UnknownAge, changed_since

    rerun = f"Run `{command}` (or `make results`) to measure again."
    commit, measures, when = run.get("commit"), run.get("measures"), run.get("date", "an unrecorded date")
    if not commit:
        return ("!!! warning \"Figures of unknown age\"\n    Measured on " + when + " without a code revision (the file "
                f"predates that record, or it ran outside a git checkout), so nothing tells whether the code they measure changed since. {rerun}\n\n")
    at = f"Measured at `{commit[:7]}` on {when}"
    if not measures:
        return (f"!!! warning \"Figures that may be stale\"\n    {at}; the file records no source paths it measures (it "
                f"predates that record), so whether their code changed since is unknown. {rerun}\n\n")
    try:
        changed = changed_since(commit, measures, root)
    except UnknownAge as exc:
        return (f"!!! note \"Age unknown here\"\n    {at}; whether the code they measure changed since cannot be "
                f"told in this copy: {exc}.\n\n")
    said = []
    if run.get("dirty"):
        said.append(f"it was measured with uncommitted changes to {_files(run['dirty'])}, which that commit does "
                    "not hold")
    if changed:
        said.append(f"since then {_files(changed)} changed")
    if not said:
        return ""
    return f"!!! warning \"Figures that may be stale\"\n    {at}; {'; '.join(said)}. {rerun}\n\n"


def results_block(name: str) -> str:
    if name not in RESULTS:
        raise GeneratedError(f"unknown results marker {name!r} (known: {', '.join(RESULTS)})")
    filename, command, renderer = RESULTS[name]
    path = RESULTS_DIR / filename
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GeneratedError(f"results/{filename}: {exc}; run `{command}` to write it") from exc
    from requant.bench.provenance import describe

    text = _demote(_renderer(renderer)(data).strip())
    run, env = data.get("run") or data.get("info"), data.get("environment")
    when = ""
    if run:
        when = describe(run)
    elif env:  # the device check records its own environment (it runs where requant's extras may be missing)
        when = (f"{env['date']}, requant {(env.get('commit') or '?')[:7]}, {env.get('cpu')} ({env.get('cores')} cores), "
                f"Python {env.get('python')}, torch {env.get('torch')}")
    if not when:
        raise GeneratedError(f"results/{filename} records no date and machine; run `{command}` again")
    source = f"`results/{filename}`, written by `{command}`"
    caption = f"*From {source}.*" if when in text else f"*Measured {when}; from {source}.*"
    return age_mark(run or env, command) + text + "\n\n" + caption + "\n"


def recipes_block() -> str:
    from requant.recipe import builtin_names, load_recipe

    recipes = [load_recipe(name) for name in builtin_names()]
    order = ["routed_expert", "router", "shared_expert", "dense_mlp", "attention", "lm_head", "embedding", "norm"]
    classes = sorted((cls for cls, _ in recipes[0].targets),
                     key=lambda c: order.index(c) if c in order else len(order))
    lines = ["| recipe | written as | global format | " + " | ".join(f"`{c}`" for c in classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for r in recipes:
        targets = dict(r.targets)
        cells = [("BF16" if targets[c] == "unquantized" else f"**{targets[c]}**") for c in classes]
        lines.append(f"| `{r.name}` | {r.export} | {r.format} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in recipes:
        extra = ""
        if r.overrides:
            extra = " Overrides (first match wins): " + ", ".join(f"`{p}` → {t}" for p, t in r.overrides) + "."
        snr = f" `requant verify` asks for at least {r.min_snr_db:g} dB SNR." if r.min_snr_db is not None else ""
        lines.append(f"- **`{r.name}`**: {' '.join(r.description.split())}{extra}{snr}")
    return "\n".join(lines) + "\n"


def cli_block() -> str:
    import argparse

    from requant.cli import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps help to the terminal's width: make it the same everywhere
    parser = build_parser()
    out = ["```text", parser.format_help().rstrip(), "```", ""]

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.extend([f"### `{prefix} {name}`", "", "```text", sub.format_help().rstrip(), "```", ""])
                    walk(sub, f"{prefix} {name}")

    walk(parser, "requant")
    return "\n".join(out)


def settings_block() -> str:
    from requant import settings

    headings = {settings.USER: "", settings.INTERNAL: "Set by requant for the processes it starts",
                settings.TEST: "Read by the test suite only"}
    out = []
    for scope, heading in headings.items():
        rows = [s for s in settings.ALL if s.scope == scope]
        if heading:
            out += [f"#### {heading}", ""]
        out += ["| variable | value | default | meaning | read by |", "|---|---|---|---|---|"]
        out += [f"| `{s.name}` | {s.expected} | {s.default_label()} | {s.description} | "
                f"{', '.join(f'`{r}`' for r in s.readers)} |" for s in rows]
        out.append("")
    return "\n".join(out)


def api_block() -> str:
    """``::: requant`` with the members of ``requant.__all__``; mkdocstrings renders each from the code and its
    docstring. Without ``__all__`` the page says so rather than guessing what is public."""
    import requant

    names = getattr(requant, "__all__", None)
    if not names:
        return ("!!! note \"No public API declared yet\"\n    `requant.__all__` is not defined, so nothing is "
                "documented here yet.\n")
    missing = [name for name in names if not hasattr(requant, name)]
    if missing:
        raise GeneratedError(f"requant.__all__ names {', '.join(map(repr, missing))}, which requant does not define")
    # members: exactly __all__, imported names included (the options of mkdocs.yml order them as __all__ does)
    return "::: requant\n    options:\n      members: [" + ", ".join(names) + "]\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        try:
            if name == "recipes":
                return recipes_block()
            if name == "cli":
                return cli_block()
            if name == "settings":
                return settings_block()
            if name == "api":
                return api_block()
            if name.startswith("results:"):
                return results_block(name.split(":", 1)[1])
        except GeneratedError as exc:
            raise GeneratedError(f"{page.file.src_path}: {exc}") from exc
        raise GeneratedError(f"{page.file.src_path}: unknown marker <!-- requant:{name} -->")

    return MARKER.sub(replace, markdown)
