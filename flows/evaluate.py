"""The evaluate flow: serve a checkpoint and its reference, smoke-test, GSM8K on both, compare, publish.

The sequence is :func:`requant.evaluation.run.evaluate_checkpoint`, the one ``requant evaluate`` runs; here its
steps are Prefect tasks (tasks/evaluate.py) and it creates the flow's artifacts. Engines are launched on the
machine running this flow (the reference server on CPU here; vLLM, ATOM or SGLang on a GPU node, see
requant/engines/engines.yaml), in Ray actors on cluster nodes (``engine_on_ray``), or attached with ``base_url``
when already running. Reports land next to the checkpoint under ``eval/`` (listed in its manifest) and as Prefect
artifacts; the checkpoint's model card gets its Quality section. A failing smoke test or gate fails the flow run,
after its report has been published.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from requant.engines.engines import RunningEngine
from requant.engines.smoke import format_result
from requant.errors import RequantError
from requant.evaluation import run
from requant.evaluation.compare import Comparison
from requant.evaluation.downstream import PLOT_PNG, REPORT_JSON, REPORT_MD, EvalSettings, scratch_dir
from requant.evaluation.report import table_rows
from requant.evaluation.run import Checks, Serving, Variant
from requant.io.transfer import object_url
from requant.manifest import eval_path
from requant.tasks.evaluate import TASK_STEPS

__all__ = ["Checks", "Serving", "Variant", "evaluate"]


def _engine(stack: ExitStack, variant: Variant, serving: Serving, log_dir: Path) -> RunningEngine:
    """The plain step, plus engines in Ray actors (``engine_on_ray``)."""
    if serving.on_ray and not variant.base_url:
        from requant.flows.engines import ray_engine

        return stack.enter_context(ray_engine(serving.engine, serving.engines_file, variant.uri, variant.name,
                                              serving.tp, serving.max_model_len,
                                              num_gpus=serving.tp if serving.gpus is None else serving.gpus))
    return run.serve(stack, variant, serving, log_dir)


class _PrefectArtifacts(run.Artifacts):
    def smoke(self, checkpoint: str, smoke: dict[str, Any]) -> None:
        print(format_result(smoke))
        create_markdown_artifact("```\n" + format_result(smoke) + "\n```", key="smoke-test",
                                 description=f"smoke test of {checkpoint}")

    def report(self, checkpoint: str, comparison: Comparison, report_dir: Path) -> None:
        report_md = (report_dir / REPORT_MD).read_text()
        create_markdown_artifact(report_md, key="gsm8k-report", description=f"GSM8K comparison of {checkpoint}")
        create_table_artifact(table_rows(comparison), key="gsm8k-scores", description="accuracy per variant and filter")
        create_link_artifact(object_url(checkpoint, eval_path(PLOT_PNG)), link_text="GSM8K plot (PNG)", key="gsm8k-plot")
        create_link_artifact(object_url(checkpoint, eval_path(REPORT_JSON)), link_text="report.json",
                             key="gsm8k-report-json")


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
    settings = EvalSettings(tuple(seeds), num_fewshot, limit, run.default_gsm8k_dir(gsm8k_dir))
    serving = Serving(engine, engines_file, tp, max_model_len, engine_on_ray, engine_gpus)
    ref_serving = replace(serving, engine=reference_engine) if reference_engine else serving
    with scratch_dir() as tmp:
        result = run.evaluate_checkpoint(Variant(checkpoint, base_url), Variant(reference, reference_base_url),
                                         settings, Path(tmp), serving=serving, reference_serving=ref_serving,
                                         checks=Checks(gate, smoke_limits), steps=replace(TASK_STEPS, serve=_engine),
                                         artifacts=_PrefectArtifacts(), progress=progress, logger=get_run_logger())
    if result.stopped:
        raise RequantError(result.failure)
    print(result.table)
    if result.failure:
        raise RequantError(result.failure)
    return result.summary()
