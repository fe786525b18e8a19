"""Starting a run and summing it up: the steps every runner takes before its first job and after its last."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from requant.errors import RequantError
from requant.io.storage import Storage
from requant.planning import Plan
from requant.run.execute import JobOutcome
from requant.run.inputs import input_files, unverifiable_inputs
from requant.run.options import ConvertSummary
from requant.run.ownership import published_key
from requant.run.records import run_key


@dataclass(frozen=True)
class RunStart:
    """A run about to start: its key, the inputs converted without a published digest, and whether the output
    already holds this very run's published checkpoint (then it is verified and reused, not converted again)."""

    key: str
    unverified_inputs: tuple[str, ...]
    published: bool


def start_run(plan: Plan, source: Storage, output: str | None, revision: str | None, unverified: bool = False,
              overwrite: bool = True) -> RunStart:
    """Everything decided before a job runs: inputs the Hub publishes no digest for are refused unless
    ``unverified``; an output holding another run's checkpoint is refused unless ``overwrite``. ``output`` None:
    the runner stages into a fresh place of its own and decides about the destination itself (the local runner),
    so its manifest is not read."""
    unchecked = unverifiable_inputs(source, input_files(plan), unverified)
    key = run_key(plan, revision)
    published = published_key(output) if output is not None else None
    if published not in (None, key) and not overwrite:
        raise RequantError(f"{output}: already holds a converted checkpoint of another run "
                           f"(pass --overwrite to replace it)")
    return RunStart(key, tuple(sorted(unchecked)), published == key)


def summarize(plan: Plan, output: str, key: str, outcomes: Iterable[JobOutcome], manifest: dict | None,
              timings: dict[str, float] | None = None, unverified: Iterable[str] = ()) -> ConvertSummary:
    """The summary of a finished run (``manifest`` None: the output was reused as it was)."""
    outcomes = list(outcomes)
    results = [o.result for o in outcomes]
    return ConvertSummary(
        output=output, recipe=plan.recipe.name, run_key=key, jobs=len(plan.jobs),
        resumed=sum(o.skipped for o in outcomes) if manifest is not None else len(plan.jobs),
        tensors=len(manifest["tensors"]) if manifest is not None else sum(len(j.specs) for j in plan.jobs),
        reused=manifest is None, bytes_in=sum(r.bytes_in for r in results), bytes_out=sum(r.size for r in results),
        unverified_inputs=tuple(manifest.get("unverified_inputs", [])) if manifest is not None else tuple(unverified),
        nodes=tuple(sorted({o.node for o in outcomes if o.node})), timings=dict(timings or {}), manifest=manifest)
