"""The watch-upstream flow: on a schedule, start a requantize deployment run for each new upstream revision.

Each tick looks up the newest revision, reads the ledger of attempts for it, asks Prefect for the state
of the run each attempt started, and either does nothing (converted, or a run is in progress), starts
the first attempt, retries a failed one (up to ``max_attempts``), or reports that it gave up. Starting an
attempt is a conditional write in the ledger first, so concurrent watchers start one run, never two.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from requant.errors import RequantError
from requant.io.storage import open_storage
from requant.release.record import latest_record
from requant.watch import (
    Attempt,
    Decision,
    Ledger,
    content_fingerprint,
    decide,
    declared_source,
    latest_revision,
    source_change,
)


def _states(flow_run_ids: list[str]) -> dict[str, str]:
    states = {}
    with get_client(sync_client=True) as client:
        for run_id in flow_run_ids:
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:  # a deleted run: decide() treats a missing state as failed
                continue
            states[run_id] = run.state.type.value if run.state else "PENDING"
    return states


def run_parameters(snapshot: str, revision: str, output: str, recipe: str, upstream: str,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The requantize run's parameters for one revision: what the watcher sets, merged group by group with the
    deployment's ``extra`` parameters (``{"evaluation": {"limit": 50}}`` keeps the watcher's ``conversion``)."""
    merged: dict[str, Any] = {"upstream": snapshot, "output": output, "recipe": recipe,
                              "conversion": {"revision": revision, "upstream_id": upstream}}
    for name, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **value}
        else:
            merged[name] = value
    return merged


@flow(name="watch-upstream", log_prints=True)
def watch_upstream(upstream: str, output_root: str, recipe: str = "kimi-k2.6-mxfp4",
                   deployment: str = "requantize/requantize", ledger: str | None = None, ref: str = "main",
                   max_attempts: int = 3, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """``upstream``: hf://org/repo or a mirror (refs/<ref> + snapshots/<revision>/); outputs go to
    ``<output_root>/<revision>/<recipe>``; the ledger defaults to ``<output_root>/.requant-watch``."""
    logger = get_run_logger()
    latest = latest_revision(upstream, ref)
    book = Ledger(ledger or f"{output_root.rstrip('/')}/.requant-watch")
    attempts = book.attempts(latest.revision)
    fingerprint = source = None
    if not attempts and book.unchanged(latest.revision) is None:  # a revision seen for the first time
        fingerprint = content_fingerprint(latest.snapshot)
        source = declared_source(latest.snapshot)
        if twin := _converted_twin(book, latest.revision, fingerprint, max_attempts):
            book.mark_unchanged(latest.revision, twin.revision, twin.output)
    if same := book.unchanged(latest.revision):
        reason = f"weights unchanged since {same['same_as']}"
        logger.info("revision %s: not converted, %s (output %s)", latest.revision, reason, same["output"])
        _ledger_artifact(book)
        return {"revision": latest.revision, "action": "unchanged", "attempt": 0, "reason": reason,
                "flow_run_id": None, "output": same["output"]}
    decision = decide(attempts, _states([a.flow_run_id for a in attempts if a.flow_run_id]), max_attempts, time.time())
    if source is not None and (change := source_change(book.last_source(latest.revision), source)):
        decision = Decision(decision.action, decision.attempt, f"{decision.reason}; {change}")
    output = f"{output_root.rstrip('/')}/{latest.revision}/{recipe}"
    started = None
    if decision.action == "submit":
        watcher = f"{socket.gethostname()}:{os.getpid()}"
        if book.claim(latest.revision, decision.attempt, watcher, fingerprint, source):
            run = run_deployment(deployment, timeout=0, as_subflow=False,
                                 parameters=run_parameters(latest.snapshot, latest.revision, output, recipe, upstream,
                                                           parameters))
            book.record_run(latest.revision, decision.attempt, str(run.id), output)
            started = str(run.id)
            logger.info("revision %s: started %s attempt %d (flow run %s)", latest.revision, deployment,
                        decision.attempt, run.id)
        else:
            decision = Decision("wait", decision.attempt, f"attempt {decision.attempt} claimed by another watcher")
    if not started:
        log = logger.warning if decision.action == "give-up" else logger.info
        log("revision %s: %s (%s)", latest.revision, decision.action, decision.reason)
    _ledger_artifact(book)
    return {"revision": latest.revision, "action": decision.action if started is None else "submitted",
            "attempt": decision.attempt, "reason": decision.reason, "flow_run_id": started, "output": output,
            "source": book.source(latest.revision) or source}


def _converted_twin(book: Ledger, revision: str, fingerprint: str | None, max_attempts: int) -> Attempt | None:
    """The attempt that converted (or is converting) another revision with the same content, if any."""
    if fingerprint is None:
        return None
    for other in book.revisions():
        if other == revision or book.fingerprint(other) != fingerprint:
            continue
        attempts = book.attempts(other)
        states = _states([a.flow_run_id for a in attempts if a.flow_run_id])
        if decide(attempts, states, max_attempts, time.time()).action in ("done", "wait"):
            return attempts[-1]
    return None


def _release_state(output: str | None) -> str:
    """What the run's release step recorded beside its checkpoint: the commit URL, or why it was not released."""
    if not output:
        return ""
    try:
        record = latest_record(open_storage(output))
    except (RequantError, OSError, ValueError):
        return ""
    return record.describe() if record else ""


def _ledger_artifact(book: Ledger) -> None:
    rows = []
    for revision in book.revisions():
        if same := book.unchanged(revision):
            rows.append({"revision": revision, "source": "", "state": f"weights unchanged since {same['same_as']}", "attempt": 0,
                         "flow_run": "", "output": same["output"] or "", "release": "", "claimed_by": "",
                         "claimed_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(same["recorded_at"]))})
            continue
        attempts = book.attempts(revision)
        states = _states([a.flow_run_id for a in attempts if a.flow_run_id])
        source = book.source(revision) or ""
        for a in attempts:
            rows.append({"revision": revision, "source": source, "state": states.get(a.flow_run_id or "", "not started"),
                         "attempt": a.number, "flow_run": a.flow_run_id or "", "output": a.output or "",
                         "release": _release_state(a.output),
                         "claimed_by": a.watcher, "claimed_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a.claimed_at))})
    create_table_artifact(rows, key="upstream-ledger", description=f"conversion attempts per upstream revision ({book.uri})")
