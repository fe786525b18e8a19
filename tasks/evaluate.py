"""Prefect tasks of the downstream evaluation; each calls one requant function.

Secrets (the engines' API key) come from ``REQUANT_API_KEY`` in the task's environment, never from
task parameters, which Prefect records and shows in its UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from requant.api_key import api_key
from requant.engines.engines import attach
from requant.engines.smoke import load_limits, smoke_test, task_prompts
from requant.evaluation.downstream import EvalSettings, evaluate_served, write_report
from requant.evaluation.gsm8k import TRAINED_TASK
from requant.evaluation.publish import publish_evaluation
from requant.evaluation.results import GSM8KResult
from requant.manifest import EVAL_DIR


@task(name="smoke-test", cache_policy=NO_CACHE)
def run_smoke_test(base_url: str, model: str, reference_base_url: str | None, reference_model: str | None,
                   limits_file: str | None = None, gsm8k_dir: str | None = None,
                   checkpoints: tuple[str, str] | None = None) -> dict[str, Any]:
    """``gsm8k_dir``: the evaluation's task. For the trained model's own task (``requant:trained``) the agreement
    prompts are its test questions: that model knows nothing else, and on the built-in GSM8K prompts its
    honest MXFP4 variant disagrees with the reference (top-1 0.50, KL 0.23). For GSM8K, the built-in prompts
    are already GSM8K questions. ``checkpoints``: the (candidate, reference) checkpoints served, so a failed
    agreement says which layer and experts differ."""
    engine = attach(base_url, model, api_key())
    reference = attach(reference_base_url, reference_model, api_key()) if reference_base_url else None
    prompts = task_prompts(gsm8k_dir) if gsm8k_dir == TRAINED_TASK else None
    return smoke_test(engine, reference, load_limits(limits_file), prompts, checkpoints)


@task(name="gsm8k", task_run_name="gsm8k-{variant}", cache_policy=NO_CACHE)
def run_gsm8k_eval(base_url: str, model: str, variant: str, settings: EvalSettings, out_dir: str,
                   progress: bool = True) -> GSM8KResult:
    return evaluate_served(base_url, model, variant, settings, Path(out_dir), api_key(), progress)


@task(name="report", cache_policy=NO_CACHE)
def build_report(candidate: GSM8KResult, reference: GSM8KResult, smoke: dict | None, out_dir: str,
                 gate_file: str | None, context: dict[str, Any]):
    return write_report(candidate, reference, smoke, Path(out_dir), gate_file, context)


@task(name="publish-evaluation", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def publish_eval(uri: str, local_dir: str, quality: str | None, summary: dict | None, prefix: str = EVAL_DIR) -> list[str]:
    return publish_evaluation(uri, Path(local_dir), quality, summary, prefix)
