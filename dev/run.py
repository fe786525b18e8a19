"""``make flow-run``: the main job on embedded defaults, on a fresh machine with no other set-up.

Starts SeaweedFS (unless ``make services-up`` already did) and a local Hugging Face Hub (requant.testing.hubserver),
publishes a synthetic upstream there as ``synthetic/<profile>`` (by default the INT4 upstream of the trained model
shipped in requant/testing/trained/assets; ``--profile tiny`` for random weights; ``--source s3`` puts it in SeaweedFS
instead), runs the requantize flow on ``hf://synthetic/<profile>@main`` (the path a real run takes from the Hub)
with the seed card's recipe (verified), produces or reuses the fp8-reference variant, smoke-tests the candidate on
the reference server and compares both on GSM8K (the trained profile: on its own GSM8K-format task), then prints
the comparison table, the verdict with the
smallest drop it could have detected, and where the report is. A PASS is then released to the local Hub as
``requant-local/<profile>-<recipe>`` (one commit, verified; ``--no-release`` skips it) and the release's URL printed.
The local Hub keeps its repositories in ``.services/hub``; ``requant hub serve .services/hub`` serves them again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from requant.errors import RequantError
from requant.io.transfer import upload_dir
from requant.progress import log_name, phase, quiet_terminal
from requant.testing import seaweed
from requant.testing.hubserver import publish_dir, serve_hub
from requant.testing.synth import synthesize

STATE = Path(".services/seaweed.json")
HUB_ROOT = Path(".services/hub")  # the local Hub's repositories: the upstream and the releases, kept between runs
EVAL_LIMIT = 50  # items x 3 seeds: the trained model's comparison sees drops of a few points (see its table)


def default_gsm8k_dir(profile: str) -> str | None:
    """The trained model's own task for the trained profile; else an offline GSM8K copy ($REQUANT_GSM8K_DIR or
    shared/data/gsm8k beside the repository), else the hub's."""
    from requant.evaluation.gsm8k import TRAINED_TASK, find_local_gsm8k

    if profile == "trained":
        return TRAINED_TASK
    found = find_local_gsm8k(__file__)
    return str(found) if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="kimi-k2.6-mxfp4")
    parser.add_argument("--profile", default="trained", choices=["trained", "tiny", "k26-topology"],
                        help="synthetic upstream: random weights (tiny, k26-topology) or the trained model")
    parser.add_argument("--bucket", default="requant")
    parser.add_argument("--source", default="hub", choices=["hub", "s3"],
                        help="where the upstream is read from: the local Hub (hf://, default) or SeaweedFS (s3://)")
    parser.add_argument("--eval-limit", type=int, default=EVAL_LIMIT, help="task items per seed (0 = all)")
    parser.add_argument("--no-eval", action="store_true", help="convert and verify only (nothing is released)")
    parser.add_argument("--no-release", action="store_true", help="do not release to the local Hub after the gate")
    parser.add_argument("--verbose", action="store_true",
                        help="everything on the terminal (default: one line per phase, the rest in out/logs/)")
    parser.add_argument("--gsm8k-dir", default=None,
                        help="train.jsonl/test.jsonl directory (default: the trained model's task for the trained "
                             "profile; else $REQUANT_GSM8K_DIR, ../shared/data/gsm8k, else the hub)")
    args = parser.parse_args(argv)
    if args.gsm8k_dir is None:
        args.gsm8k_dir = default_gsm8k_dir(args.profile)

    output = f"s3://{args.bucket}/checkpoints/{args.profile}/{args.recipe}"
    quiet = (contextlib.nullcontext() if args.verbose else
             quiet_terminal(Path(os.environ.get("OUT", "out")) / "logs" / log_name("flow-run")))
    try:
        with quiet:
            summary, server, started_here = _run(args, output)
    except RequantError as exc:  # a failed smoke test or gate: its line is above (and its table in the log)
        if args.verbose:
            print(f"\n{exc}", file=sys.stderr)
        return 1
    _summary(summary, output, server, started_here)
    return 0


def _run(args: argparse.Namespace, output: str) -> tuple[dict, seaweed.SeaweedServer, bool]:
    """The services, the upstream and the flow; returns the flow's summary (raises when the smoke test or the
    gate stopped it)."""
    server = seaweed.load_state(STATE)
    started_here = server is None
    if started_here:
        with phase("start SeaweedFS (S3)") as shown:
            server = seaweed.start(Path(".services/seaweed-data"))
            shown.result(f"{server.endpoint} (pid {server.pid})")
    os.environ.update(server.env())
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            with phase(f"synthesize the {args.profile} upstream") as shown:
                local = synthesize(tmp / args.profile, args.profile, seed=0, progress=args.verbose)
                shown.result(str(local))
            with phase("start a local Hub") as shown:
                hub = stack.enter_context(serve_hub(HUB_ROOT))
                os.environ.update({"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
                                   "HF_HUB_DISABLE_TELEMETRY": "1"})
                os.environ.setdefault("HF_TOKEN", "hf_requant_local")  # the local Hub takes uploads with any token
                shown.result(f"{hub.url} ({HUB_ROOT})")
            if args.source == "hub":
                repo = f"synthetic/{args.profile}"
                with phase("publish it on the local Hub") as shown:
                    publish_dir(HUB_ROOT, repo, local, message=f"requant synth --profile {args.profile} --seed 0",
                                if_changed=True)  # the same upstream as last time: the same commit (run key)
                    upstream = f"hf://{repo}@main"
                    shown.result(upstream)
            else:
                upstream = f"s3://{args.bucket}/upstream/{args.profile}"
                with phase("upload it to S3") as shown:
                    upload_dir(local, upstream)
                    shown.result(upstream)
            release_to = None if args.no_eval or args.no_release else f"hf://requant-local/{args.profile}-{args.recipe}"
            from requant.flows.parameters import Conversion, Evaluation
            from requant.flows.requantize import requantize
            from requant.flows.runtime import start_ephemeral_server, stop_ephemeral_server

            with phase("start Prefect (ephemeral server)"):
                start_ephemeral_server()
            try:
                summary = requantize(upstream=upstream, output=output, recipe=args.recipe,
                                     conversion=Conversion(upstream_id=f"synthetic/{args.profile}"),
                                     evaluation=Evaluation(enabled=not args.no_eval, limit=args.eval_limit or None,
                                                           gsm8k_dir=args.gsm8k_dir),
                                     release_to=release_to, progress=args.verbose)
            finally:
                stop_ephemeral_server()
            return summary, server, started_here
    finally:
        if started_here:
            seaweed.stop(server)


def _summary(summary, output: str, server, started_here: bool) -> None:
    """``summary``: the requantize flow's RequantizeResult."""
    conversion = summary.conversion
    print(f"\ncheckpoint: {output}  ({conversion.tensors} tensors, {conversion.jobs} layer jobs, "
          f"{conversion.resumed} resumed, verified)")
    if summary.evaluation is not None:
        ev = summary.evaluation
        print(f"reference: {summary.reference.output} ({'reused' if summary.reference.reused else 'converted'})")
        print(f"smoke test: {'passed' if ev['smoke']['passed'] else 'FAILED'} (top-1 agreement "
              f"{ev['smoke']['numeric']['top1_agreement']:.2f}, mean KL {ev['smoke']['numeric']['mean_kl']:.4f})")
        print(ev["table"])
        print(f"report: {ev['report']}\nplot:   {ev['plot']}")
    if summary.release is not None:
        print(f"release: {summary.release.record.describe()}\n         (the local Hub in .services/hub; serve it again "
              f"with `requant hub serve .services/hub`, then `hf download {summary.release.target.repo_id}`)")
    if not started_here:
        print(f"S3 endpoint: {server.endpoint} (make services-down stops it)")


if __name__ == "__main__":
    sys.exit(main())
