"""Compare a candidate variant's GSM8K result with a reference variant's, and apply the quality gate.

Per filter: each variant's mean ± stdev of lm-eval's per-seed scores (over its own seeds) and Welch's
test between them; then, on the items and seeds both variants ran (matched by doc_id and seed), the exact
sign-flip permutation test over items, a paired bootstrap over items, and McNemar's test on pooled (item, seed)
pairs. The unit is the item: one item under three few-shot seeds is one observation whose three outcomes are
strongly correlated, so the pooled McNemar test is too confident with more than one seed; it is reported for
comparison with published cards, and a gate may still name it.

The gate (``gate.yaml``, checked by ``gate.schema.json``) FAILS the candidate when, on any gated filter,
it is more than ``max_drop_pp`` percentage points below the reference on the paired data AND the
chosen paired test is significant at ``alpha``. It is INCONCLUSIVE, never PASS, when the reference scores
below ``min_reference_accuracy`` on a gated filter. Each filter also carries the minimum detectable drop at
80% power of the item test (:func:`~requant.evaluation.stats.item_mde`), so a PASS says how small a loss it could
have seen. Everything here is pure: results in, a frozen :class:`Comparison` out.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import yaml

from requant.errors import RequantError
from requant.evaluation.results import FILTERS, GSM8KResult
from requant.evaluation.stats import (
    BootstrapResult,
    McNemarResult,
    PermutationResult,
    WelchResult,
    item_mde,
    item_permutation,
    mcnemar,
    mean_std,
    paired_bootstrap,
    welch,
)

PAIRED_TESTS = {"permutation": "sign-flip permutation over items", "bootstrap": "paired bootstrap over items",
                "mcnemar": "McNemar exact on pooled (item, seed) pairs"}


@dataclass(frozen=True)
class Gate:
    filters: tuple[str, ...]
    max_drop_pp: float
    alpha: float
    paired_test: str  # a key of PAIRED_TESTS
    source: str       # "builtin" or the file it came from
    min_reference_accuracy: float = 0.0  # below it on a gated filter: INCONCLUSIVE

    def describe(self) -> str:
        return (f"FAIL if, on {' or '.join(self.filters)}, the candidate is more than {self.max_drop_pp:g} pp "
                f"below the reference and the {PAIRED_TESTS[self.paired_test]} test gives p < {self.alpha:g}; "
                f"INCONCLUSIVE if the reference scores below {100 * self.min_reference_accuracy:g}%")


@lru_cache(maxsize=1)
def gate_schema() -> dict[str, Any]:
    return json.loads(resources.files("requant.evaluation").joinpath("gate.schema.json").read_text())


@lru_cache(maxsize=1)
def _builtin_gate_data() -> dict[str, Any]:
    return yaml.safe_load(resources.files("requant.evaluation").joinpath("gate.yaml").read_text())


def parse_gate(data: Any, source: str) -> Gate:
    """A gate from parsed YAML; fields left out take the built-in values."""
    if data is None:
        data = {}
    try:
        jsonschema.validate(data, gate_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise RequantError(f"gate {source}: {where}: {exc.message}") from exc
    merged = {**_builtin_gate_data(), **data}
    return Gate(filters=tuple(merged["filters"]), max_drop_pp=float(merged["max_drop_pp"]),
                alpha=float(merged["alpha"]), paired_test=merged["paired_test"], source=source,
                min_reference_accuracy=float(merged["min_reference_accuracy"]))


def load_gate(path: str | Path | None = None) -> Gate:
    """The built-in gate (``path=None``) or a user YAML file with the same schema."""
    if path is None:
        return parse_gate(_builtin_gate_data(), "builtin")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RequantError(f"gate {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RequantError(f"gate {path}: not valid YAML{line}: {problem}") from exc
    return parse_gate(data, str(path))


@dataclass(frozen=True)
class VariantScores:
    variant: str
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]  # lm-eval's exact_match per seed, in ``seeds`` order
    mean: float
    stdev: float                 # sample stdev over seeds (ddof=1); 0.0 for one seed


@dataclass(frozen=True)
class FilterComparison:
    filter: str
    candidate: VariantScores
    reference: VariantScores
    delta: float                 # candidate.mean - reference.mean, accuracy units
    welch: WelchResult           # over per-seed scores (unpaired)
    permutation: PermutationResult  # over shared items, each item's outcomes summed over the shared seeds
    bootstrap: BootstrapResult   # over shared items, per-item mean over shared seeds
    mcnemar: McNemarResult       # over pooled shared (item, seed) pairs: for comparison only
    gated: bool
    gate_p_value: float          # the gate's paired test p-value
    failed: bool
    reason: str                  # one line, human-readable
    inconclusive: bool = False   # gated, and the reference is below the gate's floor
    mde: float = float("nan")    # drop detectable with 80% power at the gate's alpha (the item permutation test)

    @property
    def paired_delta(self) -> float:
        """Candidate - reference on the shared (item, seed) pairs; equals ``delta`` when both ran the same."""
        return self.bootstrap.delta


@dataclass(frozen=True)
class Comparison:
    candidate: str
    reference: str
    num_fewshot: int
    shared_seeds: tuple[int, ...]
    n_items: int                 # doc_ids both variants ran
    gate: Gate
    filters: tuple[FilterComparison, ...]
    verdict: str                 # "PASS", "FAIL" or "INCONCLUSIVE"
    notes: tuple[str, ...]       # caveats: differing seeds or items, too few seeds for Welch

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def filter(self, name: str) -> FilterComparison:
        for fc in self.filters:
            if fc.filter == name:
                return fc
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data; non-finite floats (undefined statistics) become null."""
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _problems(result: GSM8KResult, role: str) -> list[str]:
    where = f"{role} result {result.variant!r}"
    problems = []
    if len(set(result.seeds)) != len(result.seeds):
        problems.append(f"{where}: seeds repeat: {result.seeds}")
    if len(set(result.doc_ids)) != len(result.doc_ids):
        problems.append(f"{where}: doc_ids repeat")
    for name, per_seed in result.scores.items():
        for seed in result.seeds:
            if str(seed) not in per_seed:
                problems.append(f"{where}: scores[{name!r}] has no seed {seed}")
            outcomes = result.items.get(name, {}).get(str(seed))
            if outcomes is None:
                problems.append(f"{where}: items[{name!r}] has no seed {seed}")
            elif len(outcomes) != len(result.doc_ids):
                problems.append(f"{where}: items[{name!r}][{seed}] has {len(outcomes)} outcomes "
                                f"for {len(result.doc_ids)} doc_ids")
            elif any(v not in (0, 1) for v in outcomes):
                problems.append(f"{where}: items[{name!r}][{seed}] holds values other than 0 and 1")
    return problems


def _scores(result: GSM8KResult, name: str) -> VariantScores:
    per_seed = tuple(float(result.scores[name][str(s)]) for s in result.seeds)
    mean, stdev = mean_std(per_seed)
    return VariantScores(variant=result.variant, seeds=tuple(result.seeds), per_seed=per_seed, mean=mean, stdev=stdev)


def _outcomes(result: GSM8KResult, name: str, seeds: list[int], doc_ids: list[int]) -> np.ndarray:
    """Outcomes as [seed, item], rows in ``seeds`` order, columns in ``doc_ids`` order."""
    position = {d: k for k, d in enumerate(result.doc_ids)}
    columns = np.array([position[d] for d in doc_ids])
    return np.array([np.asarray(result.items[name][str(s)])[columns] for s in seeds], dtype=np.int8)


def _judge(name: str, paired_delta: float, p: float, gate: Gate, reference_mean: float) -> tuple[bool, str]:
    test = PAIRED_TESTS[gate.paired_test]
    delta_pp = 100.0 * paired_delta
    drop_pp = -delta_pp
    if name not in gate.filters:
        return False, f"{name}: not gated (Δ {delta_pp:+.2f} pp, {test} p = {p:.3g})"
    if reference_mean < gate.min_reference_accuracy:
        return False, (f"{name}: INCONCLUSIVE, the reference scores {100 * reference_mean:.2f}%, below the "
                       f"{100 * gate.min_reference_accuracy:g}% floor: it cannot show a loss (Δ {delta_pp:+.2f} pp)")
    # 1e-9 pp keeps a drop of exactly max_drop_pp (up to float noise) on the passing side.
    if drop_pp <= gate.max_drop_pp + 1e-9:
        return False, (f"{name}: pass, Δ {delta_pp:+.2f} pp is within the allowed {gate.max_drop_pp:g} pp drop "
                       f"({test} p = {p:.3g})")
    if not p < gate.alpha:
        return False, (f"{name}: pass, Δ {delta_pp:+.2f} pp exceeds the allowed {gate.max_drop_pp:g} pp drop "
                       f"but is not significant ({test} p = {p:.3g} ≥ {gate.alpha:g})")
    return True, (f"{name}: FAIL, Δ {delta_pp:+.2f} pp exceeds the allowed {gate.max_drop_pp:g} pp drop "
                  f"and is significant ({test} p = {p:.3g} < {gate.alpha:g})")


def compare(candidate: GSM8KResult, reference: GSM8KResult, gate: Gate | None = None, *,
            n_boot: int = 10000, seed: int = 0) -> Comparison:
    """Compare ``candidate`` with ``reference`` on every filter both report; ``gate=None`` is the built-in gate.

    ``n_boot`` and ``seed`` drive the paired bootstrap (deterministic for a given seed).
    """
    gate = gate if gate is not None else load_gate(None)
    problems = _problems(candidate, "candidate") + _problems(reference, "reference")
    if problems:
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems, first: {problems[0]}"
        raise RequantError(head)
    if candidate.num_fewshot != reference.num_fewshot:
        raise RequantError(f"candidate ran {candidate.num_fewshot}-shot, reference {reference.num_fewshot}-shot; "
                           "rerun one so both use the same few-shot count")
    common = set(candidate.scores) & set(reference.scores)
    names = [f for f in FILTERS if f in common] + sorted(common - set(FILTERS))
    missing = [f for f in gate.filters if f not in common]
    if missing:
        raise RequantError(f"gate {gate.source} needs filter(s) {', '.join(missing)}, which the candidate "
                           f"({sorted(candidate.scores)}) and reference ({sorted(reference.scores)}) "
                           "do not both report")
    seeds = [s for s in candidate.seeds if s in set(reference.seeds)]
    doc_ids = sorted(set(candidate.doc_ids) & set(reference.doc_ids))
    if not seeds or not doc_ids:
        raise RequantError(f"candidate {candidate.variant!r} and reference {reference.variant!r} share "
                           f"{len(seeds)} seeds and {len(doc_ids)} doc_ids; paired tests need at least one of each "
                           f"(candidate seeds {candidate.seeds}, reference seeds {reference.seeds})")

    notes = []
    if set(candidate.seeds) != set(reference.seeds):
        notes.append(f"seeds differ (candidate {candidate.seeds}, reference {reference.seeds}); "
                     f"paired tests use the shared seeds {seeds}")
    if set(candidate.doc_ids) != set(reference.doc_ids):
        notes.append(f"items differ (candidate {len(candidate.doc_ids)}, reference {len(reference.doc_ids)}); "
                     f"paired tests use the {len(doc_ids)} shared doc_ids, means and Welch use each variant's own")
    if len(candidate.seeds) < 2 or len(reference.seeds) < 2:
        notes.append("Welch's test needs at least two seeds per variant; its values are undefined")

    compared = []
    for name in names:
        cand, ref = _scores(candidate, name), _scores(reference, name)
        cand_items = _outcomes(candidate, name, seeds, doc_ids)
        ref_items = _outcomes(reference, name, seeds, doc_ids)
        perm = item_permutation(cand_items, ref_items)
        boot = paired_bootstrap(cand_items.mean(axis=0), ref_items.mean(axis=0), n_boot=n_boot, seed=seed)
        mc = mcnemar(cand_items.ravel(), ref_items.ravel())
        p = {"permutation": perm.p_value, "bootstrap": boot.p_value, "mcnemar": mc.p_exact}[gate.paired_test]
        ref_paired = float(ref_items.mean())
        failed, reason = _judge(name, boot.delta, p, gate, ref_paired)
        gated = name in gate.filters
        compared.append(FilterComparison(
            filter=name, candidate=cand, reference=ref, delta=cand.mean - ref.mean,
            welch=welch(cand.mean, cand.stdev, len(cand.seeds), ref.mean, ref.stdev, len(ref.seeds)),
            permutation=perm, bootstrap=boot, mcnemar=mc, gated=gated, gate_p_value=p, failed=failed, reason=reason,
            inconclusive=gated and ref_paired < gate.min_reference_accuracy,
            mde=item_mde(cand_items.mean(axis=0) - ref_items.mean(axis=0), gate.alpha)))

    if any(fc.failed for fc in compared):
        verdict = "FAIL"
    elif any(fc.inconclusive for fc in compared):
        verdict = "INCONCLUSIVE"
    else:
        verdict = "PASS"
    return Comparison(candidate=candidate.variant, reference=reference.variant, num_fewshot=candidate.num_fewshot,
                      shared_seeds=tuple(seeds), n_items=len(doc_ids), gate=gate, filters=tuple(compared),
                      verdict=verdict, notes=tuple(notes))
