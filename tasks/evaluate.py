"""Prefect tasks of the downstream evaluation; each calls one plain step of requant.evaluation.run, which the
evaluate flow composes through :func:`requant.evaluation.run.evaluate_checkpoint` (as ``requant evaluate`` does
without Prefect).

Secrets (the engines' API key) come from ``REQUANT_API_KEY`` in the task's environment, never from
task parameters, which Prefect records and shows in its UI.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from requant.evaluation import run
from requant.evaluation.downstream import EvalSettings
from requant.evaluation.results import GSM8KResult
from requant.manifest import EVAL_DIR


@task(name="smoke-test", cache_policy=NO_CACHE)
def run_smoke_test(base_url: str, model: str, reference_base_url: str | None, reference_model: str | None,
                   limits_file: str | None = None, gsm8k_dir: str | None = None,
                   checkpoints: tuple[str, str] | None = None) -> dict[str, Any]:
    """See :func:`requant.evaluation.run.smoke` (the agreement prompts, the localization of a failure)."""
    return run.smoke(base_url, model, reference_base_url, reference_model, limits_file, gsm8k_dir, checkpoints)


@task(name="gsm8k", task_run_name="gsm8k-{variant}", cache_policy=NO_CACHE)
def run_gsm8k_eval(base_url: str, model: str, variant: str, settings: EvalSettings, out_dir: str,
                   progress: bool = True) -> GSM8KResult:
    return run.gsm8k(base_url, model, variant, settings, out_dir, progress)


@task(name="report", cache_policy=NO_CACHE)
def build_report(candidate: GSM8KResult, reference: GSM8KResult, smoke: dict | None, out_dir: str,
                 gate_file: str | None, context: dict[str, Any]):
    return run.report(candidate, reference, smoke, out_dir, gate_file, context)


@task(name="publish-evaluation", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_eval(uri: str, local_dir: str, quality: str | None, summary: dict | None, prefix: str = EVAL_DIR) -> list[str]:
    return run.publish(uri, local_dir, quality, summary, prefix)


# The flow's steps: these tasks in place of the plain functions (serving stays the flow's own, see flows/evaluate.py).
TASK_STEPS = run.Steps(smoke=run_smoke_test, gsm8k=run_gsm8k_eval, report=build_report, publish=publish_eval)
