"""An evaluation published into a checkpoint without serving it, for tests of what reads evaluations (the release
gate, the card): made-up GSM8K outcomes (200 items x 3 seeds) given to the real comparison, gate, report and
``publish_evaluation``, so the checkpoint carries exactly what the evaluation flow would publish for that verdict."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from requant.evaluation.downstream import write_report
from requant.evaluation.publish import publish_evaluation
from requant.evaluation.results import FILTERS, GSM8KResult

SEEDS = (42, 1234, 7777)
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


def _result(variant: str, correct: np.ndarray) -> GSM8KResult:
    items = {f: {str(s): correct.tolist() for s in SEEDS} for f in FILTERS}
    scores = {f: {str(s): float(correct.mean()) for s in SEEDS} for f in FILTERS}
    return GSM8KResult(variant=variant, model=variant, base_url="http://127.0.0.1:1/v1", num_fewshot=3, limit=None,
                       seeds=list(SEEDS), doc_ids=list(range(len(correct))), scores=scores, items=items)


def attach_evaluation(checkpoint: str | Path, verdict: str, work: Path) -> dict:
    """Publish an evaluation whose gate says ``verdict`` into ``checkpoint`` (a directory or s3://); returns the
    summary the manifest records. PASS: the same answers; FAIL: 60 of ~160 right answers lost; INCONCLUSIVE: a
    reference below the gate's floor."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r}: one of {VERDICTS}")
    rng = np.random.default_rng(0)
    reference = (rng.random(200) < 0.8).astype(int)
    candidate = reference.copy()
    if verdict == "FAIL":
        candidate[np.flatnonzero(reference)[:60]] = 0
    if verdict == "INCONCLUSIVE":
        reference = candidate = (np.arange(200) < 10).astype(int)
    comparison, quality = write_report(_result("candidate", candidate), _result("fp8-reference", reference), None,
                                       work / "report")
    if comparison.verdict != verdict:
        raise AssertionError(f"made-up outcomes gave {comparison.verdict}, not {verdict}")
    summary = {"verdict": comparison.verdict, "smoke_passed": True,
               "scores": {fc.filter: {"candidate": fc.candidate.mean, "reference": fc.reference.mean,
                                      "delta": fc.delta} for fc in comparison.filters}}
    publish_evaluation(str(checkpoint), work / "report", quality, summary)
    return summary
