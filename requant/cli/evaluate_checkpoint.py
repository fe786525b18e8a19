"""``requant evaluate CANDIDATE --reference REF``: the evaluate flow's downstream as one local command.

Serves both checkpoints (or attaches to running servers), smoke-tests the candidate against the reference, runs
GSM8K on both (the reference's run reused from its ``eval/gsm8k-<protocol key>/`` when there), compares them with
the gate and publishes the report into the candidate (``eval/``, its manifest, its model card): the same function
(:func:`requant.evaluation.run.evaluate_checkpoint`) the flow runs with its Prefect tasks.

Exit status: 0 on PASS, and on INCONCLUSIVE, said plainly (the reference scores below the gate's floor, so the
gate cannot decide; a release gate refuses it; ``--require-pass`` makes it 1); 1 when the smoke test or the gate
fails (one line on stderr, after publishing); 2 for bad input (a missing or unpublished checkpoint, an unknown
engine, an unreadable gate).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("evaluate", help="serve a checkpoint and its reference, smoke test, GSM8K on both, "
                            "gate, and publish the report into the checkpoint (the evaluate flow, locally)")
    p.add_argument("candidate", help="the published checkpoint to evaluate (a directory or s3://)")
    p.add_argument("--reference", required=True, help="its published reference checkpoint (e.g. fp8-reference)")
    p.add_argument("--seeds", default="42,1234,7777", help="comma-separated; one lm-eval run per seed")
    p.add_argument("--num-fewshot", type=int, default=3)
    p.add_argument("--limit", type=int, help="items per seed (default: all 1319)")
    p.add_argument("--gsm8k-dir", help="directory with train.jsonl and test.jsonl, or requant:trained for the "
                   "trained model's own task (default: the copy beside the repository if any, else the hub's "
                   "openai/gsm8k)")
    p.add_argument("--num-concurrent", type=int, default=1)
    p.add_argument("--engine", default="reference", help="the engine serving the candidate: a name in engines.yaml")
    p.add_argument("--reference-engine", help="the engine serving the reference (default: --engine)")
    p.add_argument("--engines-file", help="a YAML adding or overriding engines.yaml's entries")
    p.add_argument("--base-url", help="attach to a server already serving the candidate instead of starting one")
    p.add_argument("--reference-base-url", help="attach to a server already serving the reference")
    p.add_argument("--gate", help="gate YAML (default: the built-in gate)")
    p.add_argument("--smoke-limits", help="YAML overriding requant/engines/smoke.yaml")
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism of the engines")
    p.add_argument("--work-dir", help="keep the servers' logs and lm-eval's outputs here (default: a temporary "
                   "directory, removed afterwards)")
    p.add_argument("--require-pass", action="store_true", help="exit 1 on INCONCLUSIVE too (only PASS exits 0)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant import settings as requant_settings
    from requant.progress import default_log_dir, log_name, quiet_terminal

    seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    quiet = sys.stderr.isatty() and not requant_settings.VERBOSE.get()
    with quiet_terminal(default_log_dir() / log_name("evaluate")) if quiet else contextlib.nullcontext():
        result = evaluate(args.candidate, args.reference, seeds=seeds, num_fewshot=args.num_fewshot,
                          limit=args.limit, gsm8k_dir=args.gsm8k_dir, num_concurrent=args.num_concurrent,
                          engine=args.engine, reference_engine=args.reference_engine, engines_file=args.engines_file,
                          base_url=args.base_url, reference_base_url=args.reference_base_url, gate=args.gate,
                          smoke_limits=args.smoke_limits, max_model_len=args.max_model_len, tp=args.tp,
                          work_dir=args.work_dir, progress=not quiet)
    return outcome(result, args.require_pass)  # on the terminal again, whether or not it showed only phases


def evaluate(candidate: str, reference: str, *, seeds: tuple[int, ...], num_fewshot: int, limit: int | None,
             gsm8k_dir: str | None, num_concurrent: int, engine: str, reference_engine: str | None,
             engines_file: str | None, base_url: str | None, reference_base_url: str | None, gate: str | None,
             smoke_limits: str | None, max_model_len: int, tp: int, work_dir: str | None, progress: bool):
    """The command's evaluation with plain parameters (an :class:`requant.evaluation.run.EvaluationResult`)."""
    from requant.evaluation.downstream import EvalSettings
    from requant.evaluation.run import Checks, Serving, Variant, default_gsm8k_dir, evaluate_checkpoint

    settings = EvalSettings(seeds, num_fewshot, limit, default_gsm8k_dir(gsm8k_dir), num_concurrent)
    serving = Serving(engine, engines_file, tp, max_model_len)
    ref_serving = Serving(reference_engine or engine, engines_file, tp, max_model_len)
    with contextlib.ExitStack() as stack:
        if work_dir:
            work = Path(work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="requant-evaluate-")))
        return evaluate_checkpoint(Variant(candidate, base_url), Variant(reference, reference_base_url), settings,
                                   work, serving=serving, reference_serving=ref_serving,
                                   checks=Checks(gate, smoke_limits), progress=progress)


def outcome(result, require_pass: bool = False) -> int:
    """Print what was decided and where it was published; the exit status (see the module's docstring)."""
    from requant.engines.smoke import format_result

    print(format_result(result.smoke))
    if result.stopped:
        print(f"smoke result published: {result.smoke_file}")
        print(f"requant evaluate: {result.failure}", file=sys.stderr)
        return 1
    print(result.table)
    print(f"report: {result.report}\nplot: {result.plot}\nreport.json: {result.report_json} (listed in the "
          "checkpoint's manifest; its model card's Quality section filled in)")
    if result.failure:
        print(f"requant evaluate: {result.failure}", file=sys.stderr)
        return 1
    if result.verdict == "INCONCLUSIVE":
        reasons = "; ".join(fc.reason for fc in result.comparison.filters if fc.inconclusive)
        print(f"INCONCLUSIVE, not a PASS: the gate could not decide ({reasons}); a release gate refuses it")
        if require_pass:
            print(f"requant evaluate: {result.checkpoint}: INCONCLUSIVE, not PASS (--require-pass)", file=sys.stderr)
            return 1
        return 0
    print(f"PASS: {result.checkpoint} against {result.reference}")
    return 0
