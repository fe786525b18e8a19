"""The whole downstream of a conversion for one candidate checkpoint and its reference, as one plain function:
serve both (or attach to running servers), smoke-test the candidate against the reference, GSM8K on the reference
(its cached run reused) and on the candidate, compare with the gate, write the report and publish it into the
candidate checkpoint (``eval/`` files, the manifest's summary, the model card's Quality section).

:func:`evaluate_checkpoint` is what ``requant evaluate``, ``requant.evaluate`` and the evaluate flow
(``flows/evaluate.py``) all run. The flow passes its Prefect tasks as the :class:`Steps` and a hook creating its
artifacts (:class:`Artifacts`); the command line and the API pass nothing and get the plain functions below. A failed
smoke test or gate is an outcome, not an error: the function returns it (:attr:`EvaluationResult.failure` says it in
one line) and the caller decides (the flow raises, the command exits non-zero). Bad input raises
:class:`~requant.errors.RequantError` before any engine starts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from requant.api_key import api_key
from requant.engines.engines import RunningEngine, attach, launch, load_engines
from requant.engines.smoke import load_limits, smoke_test, task_prompts
from requant.errors import RequantError
from requant.evaluation.compare import Comparison, load_gate
from requant.evaluation.downstream import (
    PLOT_PNG,
    REPORT_JSON,
    REPORT_MD,
    SMOKE_JSON,
    EvalSettings,
    cached_result,
    evaluate_served,
    reference_prefix,
    write_report,
)
from requant.evaluation.gsm8k import TRAINED_TASK, find_local_gsm8k
from requant.evaluation.publish import publish_evaluation
from requant.evaluation.report import format_table
from requant.evaluation.results import GSM8KResult
from requant.io.storage import open_storage
from requant.manifest import EVAL_DIR, MANIFEST_FILE, eval_path
from requant.progress import phase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """A checkpoint to evaluate, served by :func:`evaluate_checkpoint` unless ``base_url`` names a server already
    serving it."""

    uri: str
    base_url: str | None = None

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Serving:
    """How a variant is served: an engine of engines.yaml, in this process or (the flow only) in a Ray actor."""

    engine: str = "reference"
    engines_file: str | None = None
    tp: int = 1
    max_model_len: int = 16384
    on_ray: bool = False
    gpus: float | None = None  # GPUs of the Ray actor (default: tp)


@dataclass(frozen=True)
class Checks:
    """What decides pass or fail: the GSM8K gate and the smoke test's limits (None: the built-in YAML files)."""

    gate: str | None = None
    smoke_limits: str | None = None


def default_gsm8k_dir(gsm8k_dir: str | None) -> str | None:
    """``gsm8k_dir``, else the offline copy beside the repository if there is one, else None (the hub's)."""
    if gsm8k_dir is not None:
        return gsm8k_dir
    found = find_local_gsm8k()
    return str(found) if found else None


# The plain steps. Their signatures are the flow's tasks' (tasks/evaluate.py), which call them: paths as strings
# and the engines' API key read from the environment, never passed (Prefect records task parameters).

def serve(stack: ExitStack, variant: Variant, serving: Serving, log_dir: Path) -> RunningEngine:
    """Attach to ``variant.base_url``, else launch ``serving.engine`` for it on this machine (stopped with ``stack``)."""
    key = api_key()
    if variant.base_url:
        return attach(variant.base_url, None, key)
    if serving.on_ray:
        raise RequantError("serving an engine in a Ray actor needs the evaluate flow (requant.flows.evaluate)")
    spec = load_engines(serving.engines_file)[serving.engine]
    return stack.enter_context(launch(spec, variant.uri, served_model_name=variant.name, log_dir=log_dir,
                                      tp=serving.tp, max_model_len=serving.max_model_len, api_key=key))


def smoke(base_url: str, model: str, reference_base_url: str | None, reference_model: str | None,
          limits_file: str | None = None, gsm8k_dir: str | None = None,
          checkpoints: tuple[str, str] | None = None) -> dict[str, Any]:
    """The smoke test of the served candidate against the served reference. ``gsm8k_dir``: the evaluation's task.
    For the trained model's own task (``requant:trained``) the agreement prompts are its test questions: that model
    knows nothing else, and on the built-in GSM8K prompts its honest MXFP4 variant disagrees with the reference
    (top-1 0.50, KL 0.23). For GSM8K, the built-in prompts are already GSM8K questions. ``checkpoints``: the
    (candidate, reference) checkpoints served, so a failed agreement says which layer and experts differ."""
    engine = attach(base_url, model, api_key())
    reference = attach(reference_base_url, reference_model, api_key()) if reference_base_url else None
    prompts = task_prompts(gsm8k_dir) if gsm8k_dir == TRAINED_TASK else None
    return smoke_test(engine, reference, load_limits(limits_file), prompts, checkpoints)


def gsm8k(base_url: str, model: str, variant: str, settings: EvalSettings, out_dir: str,
          progress: bool = True) -> GSM8KResult:
    """GSM8K through lm-eval on one served variant; its per-seed samples and gsm8k.json in ``out_dir``."""
    return evaluate_served(base_url, model, variant, settings, Path(out_dir), api_key(), progress)


def report(candidate: GSM8KResult, reference: GSM8KResult, smoke: dict | None, out_dir: str,
           gate_file: str | None, context: dict[str, Any]) -> tuple[Comparison, str]:
    """The comparison with the gate and the report files in ``out_dir``; returns (comparison, card section)."""
    return write_report(candidate, reference, smoke, Path(out_dir), gate_file, context)


def publish(uri: str, local_dir: str, quality: str | None, summary: dict | None, prefix: str = EVAL_DIR) -> list[str]:
    """``local_dir`` into checkpoint ``uri`` under ``prefix``, listed in its manifest (and the card's Quality)."""
    return publish_evaluation(uri, Path(local_dir), quality, summary, prefix)


@dataclass(frozen=True)
class Steps:
    """The steps :func:`evaluate_checkpoint` composes; the flow replaces them with its Prefect tasks."""

    serve: Callable[[ExitStack, Variant, Serving, Path], RunningEngine] = serve
    smoke: Callable[..., dict[str, Any]] = smoke
    gsm8k: Callable[..., GSM8KResult] = gsm8k
    report: Callable[..., tuple[Comparison, str]] = report
    publish: Callable[..., list[str]] = publish


class Artifacts:
    """What a caller shows beside the run as it goes (the flow: Prefect artifacts). The base shows nothing."""

    def smoke(self, checkpoint: str, smoke: dict[str, Any]) -> None:
        """The smoke test's result, before anything else happens (also when it failed)."""

    def report(self, checkpoint: str, comparison: Comparison, report_dir: Path) -> None:
        """The comparison, once its report (``report_dir``: report.md, report.json, gsm8k.png) is published."""


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate_checkpoint` decided for ``checkpoint`` against ``reference``. ``comparison`` is None
    when the smoke test failed and the evaluation stopped there (only ``eval/smoke.json`` was published)."""

    checkpoint: str
    reference: str
    smoke: dict[str, Any]
    comparison: Comparison | None
    seconds: float
    protocol_key: str | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # filter -> candidate, reference, delta
    report: str | None = None          # <checkpoint>/eval/report.md (None: stopped)
    plot: str | None = None            # <checkpoint>/eval/gsm8k.png
    report_json: str | None = None     # <checkpoint>/eval/report.json
    smoke_file: str = ""               # <checkpoint>/eval/smoke.json

    @property
    def verdict(self) -> str | None:
        """The gate's PASS, FAIL or INCONCLUSIVE; None when stopped at the smoke test."""
        return self.comparison.verdict if self.comparison is not None else None

    @property
    def stopped(self) -> bool:
        return self.comparison is None

    @property
    def table(self) -> str:
        return format_table(self.comparison) if self.comparison is not None else ""

    @property
    def failure(self) -> str | None:
        """One line saying why the candidate failed (smoke test or gate), None if it did not fail. INCONCLUSIVE is
        not a failure here: the gate could not decide (the release gate refuses it on its own)."""
        if self.comparison is None:
            return f"smoke test failed for {self.checkpoint}; evaluation stopped (see {eval_path(SMOKE_JSON)})"
        if self.comparison.verdict == "FAIL":
            return (f"GSM8K gate failed for {self.checkpoint}: "
                    + "; ".join(fc.reason for fc in self.comparison.filters if fc.failed))
        return None

    def summary(self) -> dict[str, Any]:
        """The evaluate flow's result (JSON-able)."""
        return {"checkpoint": self.checkpoint, "reference": self.reference, "verdict": self.verdict,
                "table": self.table, "smoke": {"passed": self.smoke["passed"], "numeric": self.smoke["numeric"]},
                "report": self.report, "plot": self.plot, "scores": self.scores, "seconds": self.seconds}


def check_published(uri: str, role: str) -> None:
    """``uri`` is a published checkpoint (its manifest is where the evaluation is recorded); one line if not."""
    storage = open_storage(uri)                     # a missing directory or bucket fails here, in one line
    if not storage.exists(MANIFEST_FILE):
        raise RequantError(f"{uri}: no {MANIFEST_FILE}; the {role} must be a published checkpoint "
                           "(requant convert writes one)")


def smoke_figures(smoke: dict) -> str:
    numeric = smoke.get("numeric") or {}
    if numeric.get("top1_agreement") is None or numeric.get("mean_kl") is None:
        return ""
    return f" (next-token top-1 agreement {numeric['top1_agreement']:.2f}, mean KL {numeric['mean_kl']:.4f})"


def evaluate_checkpoint(candidate: Variant, reference: Variant, settings: EvalSettings, work: Path, *,
                        serving: Serving = Serving(), reference_serving: Serving | None = None,
                        checks: Checks = Checks(), steps: Steps = Steps(), artifacts: Artifacts | None = None,
                        progress: bool = True, logger: logging.Logger | logging.LoggerAdapter | None = None,
                        ) -> EvaluationResult:
    """Evaluate ``candidate`` against ``reference`` (both published checkpoints: directories or s3://) and publish
    the evaluation into the candidate checkpoint; ``work``: an existing scratch directory (servers' logs, lm-eval's
    outputs, the report before it is published). ``reference_serving``: another engine for the reference (default:
    ``serving``). The reference's GSM8K run is reused from ``<reference>/eval/gsm8k-<protocol key>/`` when there,
    else computed and published there. Returns the outcome; raises only for bad input or a step that broke."""
    logger = logger or log
    artifacts = artifacts or Artifacts()
    ref_serving = reference_serving or serving
    started = time.perf_counter()
    check_published(candidate.uri, "candidate")
    check_published(reference.uri, "reference")
    load_gate(checks.gate)                                # a bad gate or limits file fails now, not after GSM8K
    load_limits(checks.smoke_limits)
    for variant, how in ((candidate, serving), (reference, ref_serving)):
        if not variant.base_url and how.engine not in (known := load_engines(how.engines_file)):
            raise RequantError(f"unknown engine {how.engine!r} (engines.yaml has {', '.join(sorted(known))})")
    checkpoint = candidate.uri
    report_dir = work / "report"                                   # published as a whole: nothing stale in it
    for ours in (report_dir, work / "reference-eval"):
        shutil.rmtree(ours, ignore_errors=True)
    with ExitStack() as engines:
        with phase(f"serve {candidate.name} and {reference.name} ({serving.engine})") as shown:
            cand = steps.serve(engines, candidate, serving, work / "logs")
            ref = steps.serve(engines, reference, ref_serving, work / "logs")
            shown.result(f"{cand.base_url}, {ref.base_url}")
        logger.info("serving %s at %s and %s at %s", cand.served_model_name, cand.base_url, ref.served_model_name,
                    ref.base_url)

        with phase(f"smoke test {candidate.name} against {reference.name}") as shown:
            smoke_result = steps.smoke(cand.base_url, cand.served_model_name, ref.base_url, ref.served_model_name,
                                       checks.smoke_limits, settings.gsm8k_dir, (candidate.uri, reference.uri))
            shown.result(("passed" if smoke_result["passed"] else "FAILED") + smoke_figures(smoke_result))
        artifacts.smoke(checkpoint, smoke_result)
        if not smoke_result["passed"]:
            report_dir.mkdir(parents=True)
            (report_dir / SMOKE_JSON).write_text(json.dumps(smoke_result, indent=2))
            steps.publish(checkpoint, str(report_dir), None, {"smoke_passed": False})
            return EvaluationResult(checkpoint, reference.uri, smoke_result, None,
                                    round(time.perf_counter() - started, 1), smoke_file=_at(checkpoint, SMOKE_JSON))

        key = settings.protocol_key(ref_serving.engine if not reference.base_url else "external")
        ref_result = cached_result(reference.uri, key)
        if ref_result is None:
            ref_dir = work / "reference-eval"
            ref_result = steps.gsm8k(ref.base_url, ref.served_model_name, reference.name, settings, str(ref_dir),
                                     progress)
            steps.publish(reference.uri, str(ref_dir), None, {"gsm8k_protocol": key}, prefix=reference_prefix(key))
        else:
            logger.info("reusing the reference's GSM8K result %s/%s", reference.uri, reference_prefix(key))
            with phase(f"GSM8K {reference.name}") as shown:
                shown.result(f"reused the result of the same protocol ({reference.uri}/{reference_prefix(key)})")
        cand_result = steps.gsm8k(cand.base_url, cand.served_model_name, candidate.name, settings,
                                  str(report_dir / "candidate"), progress)
    seconds = round(time.perf_counter() - started, 1)

    context = {"checkpoint": checkpoint, "reference": reference.uri, "engine": serving.engine, "protocol_key": key,
               "engines": {"candidate": cand.engine, "reference": ref.engine, "candidate_url": cand.base_url},
               "settings": {"seeds": list(settings.seeds), "num_fewshot": settings.num_fewshot, "limit": settings.limit,
                            "data": settings.gsm8k_dir or "hub:openai/gsm8k"}, "seconds": seconds}
    comparison, quality = steps.report(cand_result, ref_result, smoke_result, str(report_dir), checks.gate, context)
    scores = {fc.filter: {"candidate": fc.candidate.mean, "reference": fc.reference.mean, "delta": fc.delta}
              for fc in comparison.filters}
    summary = {"verdict": comparison.verdict, "smoke_passed": True, "protocol_key": key, "scores": scores}
    with phase(f"publish the report into {candidate.name}") as shown:
        steps.publish(checkpoint, str(report_dir), quality, summary)
        shown.result(_at(checkpoint, REPORT_MD))
    artifacts.report(checkpoint, comparison, report_dir)
    return EvaluationResult(checkpoint, reference.uri, smoke_result, comparison, seconds, key, scores,
                            report=_at(checkpoint, REPORT_MD), plot=_at(checkpoint, PLOT_PNG),
                            report_json=_at(checkpoint, REPORT_JSON), smoke_file=_at(checkpoint, SMOKE_JSON))


def _at(checkpoint: str, name: str) -> str:
    return f"{checkpoint.rstrip('/')}/{eval_path(name)}"
