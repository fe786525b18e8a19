"""Render a :class:`~requant.evaluation.compare.Comparison`: markdown report, table rows, PNG plot, card section; and
read one back from the JSON a report stores (:func:`comparison_from_json`).

Accuracies print as percentages, differences in percentage points (pp). The plot uses matplotlib's Agg
canvas directly (no pyplot, so no global figure state and nothing ever shown).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from requant.errors import RequantError
from requant.evaluation.compare import PAIRED_TESTS, Comparison, FilterComparison, VariantScores

CANDIDATE_COLOR, REFERENCE_COLOR = "#1f77b4", "#9a9a9a"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _pp(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.2f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _acc(v: VariantScores) -> str:
    return f"{_pct(v.mean)} ± {_pct(v.stdev)}"


def _per_seed(v: VariantScores) -> str:
    return ", ".join(f"{s}: {_pct(x)}" for s, x in zip(v.seeds, v.per_seed))


def _welch(fc: FilterComparison) -> str:
    w = fc.welch
    if not math.isfinite(w.p_value):
        return "n/a"
    df = "n/a" if not math.isfinite(w.df) else f"{w.df:.1f}"
    return f"t = {w.t:.2f}, df {df}, p = {_p(w.p_value)}"


def _setup(c: Comparison) -> str:
    seeds = "/".join(str(s) for s in c.shared_seeds)
    return (f"lm-eval `gsm8k`, {c.num_fewshot}-shot, exact match; {c.n_items} items and seeds {seeds} "
            f"shared by both variants")


def _tests_table(c: Comparison) -> list[str]:
    lines = ["| filter | Δ (pp) | Welch (over seeds) | sign-flip over items, p (items differing) | "
             "bootstrap over items 95% CI (pp), p | McNemar pooled b / c, p | detectable drop (pp, 80% power) "
             "| gate |", "|---|---|---|---|---|---|---|---|"]
    for fc in c.filters:
        mc, bs, pm = fc.mcnemar, fc.bootstrap, fc.permutation
        lines.append(f"| {fc.filter} | {_pp(fc.delta)} | {_welch(fc)} | p = {_p(pm.p_value)} ({pm.n_differing}) "
                     f"| [{_pp(bs.ci_low)}, {_pp(bs.ci_high)}], p = {_p(bs.p_value)} "
                     f"| {mc.b} / {mc.c}, p = {_p(mc.p_exact)} | {_mde(fc)} | {_gate_cell(fc)} |")
    return lines


def _mde(fc: FilterComparison) -> str:
    return "n/a" if not math.isfinite(fc.mde) else f"{100 * fc.mde:.2f}"


def power_statement(c: Comparison) -> str:
    """What the verdict could have seen: the smallest drop each gated filter detects with 80% power."""
    parts = [f"{fc.filter} {_mde(fc)} pp" for fc in c.filters if fc.gated]
    return (f"With {c.n_items} items x {len(c.shared_seeds)} seed(s), a drop is detected with 80% power at "
            f"alpha {c.gate.alpha:g} from: {', '.join(parts)} (sign-flip permutation test over items).")


def _gate_cell(fc: FilterComparison) -> str:
    if not fc.gated:
        return "not gated"
    return "**FAIL**" if fc.failed else ("INCONCLUSIVE" if fc.inconclusive else "pass")


def format_table(c: Comparison) -> str:
    """Plain text for a terminal: one line per variant and filter (accuracy %), then per filter the Δ, the
    paired tests and the gate, then the verdict and what it could have detected."""
    lines = [f"GSM8K: {c.candidate} vs {c.reference} ({_setup(c)})",
             f"  {'variant':28s} {'filter':17s} {'accuracy %':>18s}"]
    for fc in c.filters:
        for v in (fc.candidate, fc.reference):
            lines.append(f"  {v.variant:28s} {fc.filter:17s} {_acc(v):>18s}")
    lines.append(f"  {'filter':17s} {'Δ pp':>7s} {'items p':>8s} {'bootstrap p':>12s} {'pooled McNemar b/c, p':>22s} "
                 f"{'MDE pp':>7s}  gate")
    for fc in c.filters:
        mc = fc.mcnemar
        lines.append(f"  {fc.filter:17s} {_pp(fc.delta):>7s} {_p(fc.permutation.p_value):>8s} "
                     f"{_p(fc.bootstrap.p_value):>12s} {f'{mc.b}/{mc.c}, {_p(mc.p_exact)}':>22s} "
                     f"{_mde(fc):>7s}  {_gate_cell(fc).strip('*')}")
    lines.append(f"verdict: {c.verdict}. {power_statement(c)}")
    return "\n".join(lines)


def _verdict_lines(c: Comparison) -> list[str]:
    lines = [f"**Gate: {c.verdict}.** {c.gate.describe()} (gate: {c.gate.source}).", "", power_statement(c), ""]
    lines += [f"- {fc.reason}" for fc in c.filters]
    lines += [f"- Note: {note}" for note in c.notes]
    n_boot = c.filters[0].bootstrap.n_boot if c.filters else 0
    lines += ["", (f"Δ = candidate − reference. The unit is the item ({c.n_items}): the sign-flip test is exact over "
                   "the signs of each item's difference summed over the seeds, and the bootstrap resamples items "
                   f"({n_boot} resamples) using each item's mean over seeds. McNemar pools {len(c.shared_seeds)} "
                   "seed(s) × items as if they were independent (b = candidate right and reference wrong, c = the "
                   "reverse); it is shown for comparison with published cards and is too confident with more than "
                   "one seed.")]
    return lines


def smoke_lines(smoke: dict[str, Any] | None, heading: str) -> list[str]:
    """The smoke test's result under a ``heading`` ("##", "###") and one line per check; [] without one."""
    if smoke is None:
        return []
    if not isinstance(smoke, dict) or "passed" not in smoke or not isinstance(smoke.get("checks", []), list):
        raise RequantError("smoke report: expected a mapping with 'passed' (bool) and 'checks' (list)")
    lines = ["", f"{heading} Smoke test: {'passed' if smoke['passed'] else 'FAILED'}", ""]
    for k, check in enumerate(smoke.get("checks", [])):
        if not isinstance(check, dict) or "name" not in check or "passed" not in check:
            raise RequantError(f"smoke report: checks[{k}] needs 'name' and 'passed'")
        detail = f": {check['detail']}" if check.get("detail") else ""
        lines.append(f"- {'✅' if check['passed'] else '❌'} {check['name']}{detail}")
    return lines


def markdown(comparison: Comparison, smoke: dict[str, Any] | None = None) -> str:
    """A concise standalone report: accuracies, tests, gate verdict and, if given, the smoke test."""
    c = comparison
    lines = [f"# GSM8K: {c.candidate} vs {c.reference}: {c.verdict}", "", _setup(c) + ".", "",
             "| variant | filter | accuracy % (mean ± stdev) | per seed % |", "|---|---|---|---|"]
    for v in ("candidate", "reference"):
        for fc in c.filters:
            scores = getattr(fc, v)
            lines.append(f"| {scores.variant} ({v}) | {fc.filter} | {_acc(scores)} | {_per_seed(scores)} |")
    lines += ["", *_tests_table(c), "", *_verdict_lines(c), *smoke_lines(smoke, "##")]
    return "\n".join(lines) + "\n"


def quality_section(comparison: Comparison, smoke: dict[str, Any] | None = None, figure: str | None = None) -> str:
    """The body of a model card's ``## Quality`` section (no heading); ``figure`` links a plot by relative path."""
    c = comparison
    lines = [f"GSM8K against `{c.reference}`: {_setup(c)}. Accuracy in %, mean ± stdev over seeds.", "",
             (f"| filter | this model (`{c.candidate}`) | `{c.reference}` | Δ (pp) | Welch p (seed means) | "
              "items p (sign-flip) | bootstrap 95% CI (pp) | detectable drop (pp) |"),
             "|---|---|---|---|---|---|---|---|"]
    for fc in c.filters:
        lines.append(f"| {fc.filter} | {_acc(fc.candidate)} | {_acc(fc.reference)} | {_pp(fc.delta)} "
                     f"| {_p(fc.welch.p_value)} | {_p(fc.permutation.p_value)} "
                     f"| [{_pp(fc.bootstrap.ci_low)}, {_pp(fc.bootstrap.ci_high)}] | {_mde(fc)} |")
    lines += ["", *_verdict_lines(c)]
    if figure:
        lines += ["", f"![GSM8K accuracy per seed]({figure})"]
    lines += smoke_lines(smoke, "###")
    return "\n".join(lines) + "\n"


def comparison_from_json(data: Any, where: str = "report.json") -> Comparison:
    """The :class:`Comparison` whose :meth:`~Comparison.to_json` is ``data`` (undefined statistics, stored as null,
    come back as NaN; fields a report of an earlier requant lacks take their defaults)."""
    try:
        return _rebuild(Comparison, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise RequantError(f"{where}: not a comparison requant wrote ({type(exc).__name__}: {exc})") from exc


def _rebuild(kind: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TypeError(f"{kind.__name__} needs an object, got {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _rebuild(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)
                       if f.name in value or f.default is dataclasses.MISSING})
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return tuple(_rebuild(typing.get_args(kind)[0], v) for v in value)
    if kind is float:
        if value is None:
            return math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


def table_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """One flat row per filter (str, float and int values; undefined statistics are None), e.g. for a
    Prefect table artifact. Accuracies are fractions, ``*_pp`` fields percentage points."""
    def num(x: float) -> float | None:
        return float(x) if math.isfinite(x) else None

    rows = []
    for fc in comparison.filters:
        rows.append({
            "filter": fc.filter,
            "candidate": fc.candidate.variant, "candidate_mean": num(fc.candidate.mean),
            "candidate_stdev": num(fc.candidate.stdev),
            "reference": fc.reference.variant, "reference_mean": num(fc.reference.mean),
            "reference_stdev": num(fc.reference.stdev),
            "delta_pp": num(100 * fc.delta),
            "welch_t": num(fc.welch.t), "welch_df": num(fc.welch.df), "welch_p": num(fc.welch.p_value),
            "items_p": num(fc.permutation.p_value), "items_differing": fc.permutation.n_differing,
            "mcnemar_b": fc.mcnemar.b, "mcnemar_c": fc.mcnemar.c, "mcnemar_p_exact": num(fc.mcnemar.p_exact),
            "bootstrap_delta_pp": num(100 * fc.bootstrap.delta), "bootstrap_ci_low_pp": num(100 * fc.bootstrap.ci_low),
            "bootstrap_ci_high_pp": num(100 * fc.bootstrap.ci_high), "bootstrap_p": num(fc.bootstrap.p_value),
            "gate_test": PAIRED_TESTS[comparison.gate.paired_test], "gate_p": num(fc.gate_p_value),
            "gate": _gate_cell(fc).strip("*"), "reason": fc.reason, "verdict": comparison.verdict,
            "mde_pp": num(100 * fc.mde),
        })
    return rows


def plot(comparison: Comparison, path: str | Path) -> Path:
    """Grouped bars (mean accuracy per filter and variant, stdev error bars, seed points) as a PNG."""
    c = comparison
    path = Path(path)
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.36
    values = []
    for k, fc in enumerate(c.filters):
        for offset, scores, color, role in ((-width / 2, fc.candidate, CANDIDATE_COLOR, "candidate"),
                                            (width / 2, fc.reference, REFERENCE_COLOR, "reference")):
            x, mean, sd = k + offset, 100 * scores.mean, 100 * scores.stdev
            ax.bar(x, mean, width * 0.95, yerr=sd, capsize=5, color=color, alpha=0.85,
                   label=f"{scores.variant} ({role})" if k == 0 else None)
            seeds = 100 * np.asarray(scores.per_seed)
            jitter = np.linspace(-width / 3, width / 3, len(seeds)) if len(seeds) > 1 else np.zeros(1)
            ax.scatter(x + jitter, seeds, s=22, color="white", edgecolor="black", linewidth=0.8, zorder=3,
                       label="seed" if k == 0 and role == "candidate" else None)
            ax.annotate(f"{mean:.2f}", (x, max(mean + sd, *seeds)), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=9)
            values += [mean - sd, mean + sd, *seeds]
    if values:
        lo, hi = min(values), max(values)
        pad = max(1.0, 0.5 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + 2.0 * pad))
    ax.set_xticks(range(len(c.filters)), [fc.filter for fc in c.filters])
    ax.set_ylabel("exact match, % (axis does not start at 0)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncols=3, fontsize=8, framealpha=0.9)
    deltas = ", ".join(f"{fc.filter} Δ {_pp(fc.delta)} pp" for fc in c.filters)
    ax.set_title(f"{deltas}\nmean ± stdev over seeds {'/'.join(map(str, c.shared_seeds))}, {c.num_fewshot}-shot",
                 fontsize=9)
    fig.suptitle(f"GSM8K: {c.candidate} vs {c.reference}: {c.verdict}", fontsize=12, fontweight="bold",
                 color={"PASS": "#2e7d32", "FAIL": "#c62828"}.get(c.verdict, "#b26a00"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
