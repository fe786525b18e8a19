"""requant's public Python API: what the CLI and the flows call, and what a notebook or script can call.

    import requant

    summary = requant.convert("hf://moonshotai/Kimi-K2.6@main", "out/kimi-k2.6-mxfp4", "kimi-k2.6-mxfp4")
    requant.verify(summary.output)
    result = requant.evaluate(summary.output, "out/fp8-reference", seeds=(42,), limit=50)
    requant.release_checkpoint(summary.output, "hf://ORG/Kimi-K2.6-MXFP4")   # only a PASS

``convert`` runs every layer job on this machine (``requant convert --local``); the same conversion spread over a
Ray cluster is the ``requantize`` flow (``flows/requantize.py``), which takes the same steps (:mod:`requant.run`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requant.io.storage import open_storage
from requant.planning import Plan, build_plan
from requant.recipe import Recipe, load_recipe
from requant.release.upload import ReleaseOptions, ReleaseResult
from requant.run import ConvertOptions, ConvertSummary, run_local
from requant.verification import VerifySummary
from requant.verification import verify as _verify

DEFAULT_RECIPE = "kimi-k2.6-mxfp4"


def _options(cls, options, fields: dict[str, Any]):
    if options is not None and fields:
        raise TypeError(f"pass either options= or keyword options, not both ({', '.join(sorted(fields))})")
    return options if options is not None else cls(**fields)


def convert(source: str, dest: str, recipe: str = DEFAULT_RECIPE, options: ConvertOptions | None = None,
            **fields: Any) -> ConvertSummary:
    """Convert the checkpoint at ``source`` (a directory, ``s3://bucket/prefix`` or ``hf://org/repo@revision``)
    into the directory ``dest`` with ``recipe`` (a built-in name or a recipe YAML's path), resumably and published
    atomically. Options are a :class:`ConvertOptions` or its fields as keywords (``progress=False``)."""
    return run_local(source, dest, recipe, _options(ConvertOptions, options, fields))


def verify(checkpoint: str, digests: Mapping[str, str | None] | None = None) -> VerifySummary:
    """Check the converted checkpoint at ``checkpoint`` (a directory or s3://) against its manifest: every file's
    size and sha256, every tensor's header, the index and the config. Raises :class:`requant.errors.VerifyError`
    listing every problem; returns the counts checked. ``digests``: sha256 by file as read just now elsewhere (the
    flow hashes the shards in parallel on the cluster); every other file is hashed here."""
    return _verify(checkpoint, digests)


def plan(source: str, recipe: str = DEFAULT_RECIPE, quark_version: str | None = None,
         fused_excludes: bool | None = None, shared_global_scale: bool | None = None, expert_groups: int = 1) -> Plan:
    """The layer jobs converting ``source`` with ``recipe`` would run, every header read and every problem found
    before any tensor is converted (:class:`requant.errors.PlanError` lists them all); ``expert_groups`` > 1 cuts
    each MoE layer's job into that many jobs of consecutive experts, and the non-layer job into up to as many by
    whole tensors (:func:`requant.planning.split_plan`)."""
    return build_plan(open_storage(source), load_recipe(recipe, quark_version, fused_excludes, shared_global_scale),
                      expert_groups)


@dataclass(frozen=True)
class EvalOptions:
    """How a candidate is judged against its reference: ``engine`` (a name in requant/engines/engines.yaml) serves
    both; GSM8K runs ``seeds`` with ``num_fewshot`` examples over ``limit`` items (None: all) of ``gsm8k_dir``
    (None: the copy found beside the checkout, else the hub's; ``requant:trained``: the trained model's task);
    ``gate``: a gate YAML (None: the built-in one); ``out_dir``: where the servers' logs and lm-eval's outputs go
    (None: a temporary directory, removed afterwards)."""

    engine: str = "reference"
    seeds: tuple[int, ...] = (42, 1234, 7777)
    limit: int | None = None
    num_fewshot: int = 3
    gsm8k_dir: str | None = None
    gate: str | None = None
    out_dir: str | None = None
    max_model_len: int = 4096


def evaluate(candidate: str, reference: str, options: EvalOptions | None = None, **fields: Any):
    """What ``requant evaluate`` and the evaluate flow do (:func:`requant.evaluation.run.evaluate_checkpoint`): serve
    the published checkpoints ``candidate`` and ``reference`` (directories or s3://), smoke-test the candidate
    against the reference, and if it passes run GSM8K on both (the reference's run reused when it is cached in its
    ``eval/``) and compare them with the gate; the report is published into the candidate (``eval/``, its manifest,
    its model card). Returns a :class:`requant.evaluation.run.EvaluationResult` (``smoke``, ``comparison``,
    ``verdict``, ``scores``, where the report is; ``stopped`` when the smoke test failed). A failed smoke test or
    gate is returned, not raised; bad input (an unpublished checkpoint, an unknown engine) raises."""
    from requant.evaluation.downstream import EvalSettings
    from requant.evaluation.run import Checks, Serving, Variant, default_gsm8k_dir, evaluate_checkpoint

    opts = _options(EvalOptions, options, fields)
    settings = EvalSettings(tuple(opts.seeds), opts.num_fewshot, opts.limit, default_gsm8k_dir(opts.gsm8k_dir))
    with tempfile.TemporaryDirectory(prefix="requant-evaluate-") as scratch:
        work = Path(opts.out_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        return evaluate_checkpoint(Variant(candidate), Variant(reference), settings, work,
                                   serving=Serving(opts.engine, max_model_len=opts.max_model_len),
                                   checks=Checks(opts.gate), progress=False)


def release_checkpoint(checkpoint: str, target: str, options: ReleaseOptions | None = None,
                       **fields: Any) -> ReleaseResult:
    """Release the published ``checkpoint`` (a directory or s3://) to ``target`` (``hf://ORG/REPO[@BRANCH]``) as one
    commit verified against its manifest, as ``requant release`` does: only if its evaluation PASSed (else
    :class:`requant.errors.RequantError`, unless ``force`` gives the reason the card will show). ``options`` (or its
    fields as keywords): :class:`requant.release.ReleaseOptions`."""
    from requant.release import release

    return release(checkpoint, target, _options(ReleaseOptions, options, fields))


__all__ = ["DEFAULT_RECIPE", "ConvertOptions", "ConvertSummary", "EvalOptions", "Plan", "Recipe", "ReleaseOptions",
           "ReleaseResult", "VerifySummary", "convert", "evaluate", "load_recipe", "open_storage", "plan",
           "release_checkpoint", "verify"]
