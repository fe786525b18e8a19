"""What the evaluation flow decides for one served candidate: the smoke test, then (only if it passed) GSM8K
and the gate's comparison, against a reference server already running and its result already computed, with
nothing published. One helper for the measurements (``dev/measure_trained.py``) and the trained-model tests, which
judge many variants against one reference server (and score variants the smoke test stopped). The flow,
``requant evaluate`` and ``requant.evaluate`` run the whole downstream, publishing included, through
:func:`requant.evaluation.run.evaluate_checkpoint`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from requant.engines.engines import RunningEngine, launch, load_engines
from requant.engines.smoke import SmokeLimits, load_limits, smoke_test, task_prompts
from requant.evaluation.compare import Comparison, compare
from requant.evaluation.gsm8k import run_gsm8k
from requant.evaluation.results import GSM8KResult


@dataclass(frozen=True)
class Judgement:
    smoke: dict
    smoke_seconds: float
    result: GSM8KResult | None = None            # None: stopped at the smoke test
    comparison: Comparison | None = None
    gsm8k_seconds: float | None = None

    @property
    def stopped(self) -> bool:
        return self.comparison is None


@dataclass(frozen=True)
class Protocol:
    """How GSM8K is run: the same for the candidate and the reference."""

    gsm8k_dir: str | None
    seeds: tuple[int, ...] = (42, 1234, 7777)
    limit: int | None = None
    num_fewshot: int = 3


def evaluate_reference(reference: RunningEngine, protocol: Protocol, out_dir: Path) -> GSM8KResult:
    return run_gsm8k(reference.base_url, reference.served_model_name, variant=reference.served_model_name,
                     seeds=list(protocol.seeds), num_fewshot=protocol.num_fewshot, limit=protocol.limit,
                     gsm8k_dir=protocol.gsm8k_dir, out_dir=out_dir, progress=False)


def judge(candidate: RunningEngine, reference: RunningEngine, reference_result: GSM8KResult | None,
          protocol: Protocol, out_dir: Path, *, limits: SmokeLimits, prompts: tuple[str, ...] | None = None,
          checkpoints: tuple[str, str] | None = None, score_after_failed_smoke: bool = False) -> Judgement:
    """Smoke test ``candidate`` against ``reference``; if it passes (or ``score_after_failed_smoke``, which the
    measurements use to show what a stopped variant would have scored), GSM8K and the comparison with
    ``reference_result`` (None: the smoke test alone)."""
    started = time.perf_counter()
    smoke = smoke_test(candidate, reference, limits, prompts, checkpoints)
    smoke_seconds = time.perf_counter() - started
    if reference_result is None or (not smoke["passed"] and not score_after_failed_smoke):
        return Judgement(smoke, smoke_seconds)
    started = time.perf_counter()
    result = run_gsm8k(candidate.base_url, candidate.served_model_name, variant=candidate.served_model_name,
                       seeds=list(protocol.seeds), num_fewshot=protocol.num_fewshot, limit=protocol.limit,
                       gsm8k_dir=protocol.gsm8k_dir, out_dir=out_dir, progress=False)
    return Judgement(smoke, smoke_seconds, result, compare(result, reference_result), time.perf_counter() - started)


def serve_and_judge(checkpoint: Path | str, name: str, reference: RunningEngine, reference_checkpoint: Path | str,
                    reference_result: GSM8KResult | None, protocol: Protocol, out_dir: Path, log_dir: Path,
                    score_after_failed_smoke: bool = False) -> Judgement:
    """Serve ``checkpoint`` with ``requant serve`` and :func:`judge` it the way the evaluation flow does: the smoke
    test with the flow's limits and the task's own agreement prompts (localizing against ``reference_checkpoint``
    when it fails), then GSM8K and the comparison. The server is stopped before this returns."""
    with launch(load_engines()["reference"], str(checkpoint), served_model_name=name, log_dir=log_dir,
                max_model_len=4096) as server:
        return judge(server, reference, reference_result, protocol, out_dir, limits=load_limits(),
                     prompts=task_prompts(protocol.gsm8k_dir) if protocol.gsm8k_dir else None,
                     checkpoints=(str(checkpoint), str(reference_checkpoint)),
                     score_after_failed_smoke=score_after_failed_smoke)
