"""``requant convert``: an upstream checkpoint through a recipe, here (``--local``) or on the requantize flow.

The flow is the ``convert_flow`` callable the console script (``requant.flows.cli``) passes in, so that the library
never imports orchestration. :func:`convert` is the one place the command calls the library.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from requant.cli._arguments import positive_int
from requant.constants import QUARK_RELEASES
from requant.errors import RequantError

ConvertFlow = Callable[[str, str, str, Any], Any]  # (src, dst, recipe, ConvertOptions) -> ConvertSummary


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("convert", help="convert an upstream checkpoint with a recipe")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--recipe", required=True, help="built-in recipe name or path to a recipe YAML")
    p.add_argument("--quark-version", choices=list(QUARK_RELEASES),
                   help="the AMD Quark release whose file-to-file export the output equals byte for byte (default: the "
                        "recipe's, 0.11 = Quark 0.11.2; 0.13 quantizes the exact FP32 decode of INT4 weights)")
    p.add_argument("--no-fused-excludes", dest="fused_excludes", action="store_const", const=False,
                   help="write Quark's exclude list exactly (default: it also names the fused modules SGLang and vLLM "
                        "build from excluded modules, e.g. mlp.gate_up_proj, so that SGLang keeps them BF16)")
    p.add_argument("--no-shared-global-scale", dest="shared_global_scale", action="store_const", const=False,
                   help="NVFP4: give each module its own global scale except where llm-compressor shares one (its "
                        "bytes exactly); default: one per set of modules the engines fuse, e.g. an expert's gate_proj "
                        "and up_proj, whose shared scale vLLM reads for both")
    p.add_argument("--local", action="store_true",
                   help="run every layer job in this process (default: the Prefect flow on Ray; SRC/DST may be s3://)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a converted checkpoint already at DST (default: refuse; the same run is resumed or, "
                        "once finished, verified and reused by the flow)")
    p.add_argument("--device", default="cpu",
                   help="torch device for the kernels (cpu, cuda, cuda:1, ...; ROCm: cuda); the flow reserves one GPU "
                        "per layer job for a cuda device")
    p.add_argument("--threads", type=int, default=0,
                   help="transcode threads per layer job (default 0: with --local every core this process may use; "
                        "the flow: 1 per Ray task)")
    p.add_argument("--jobs", type=int, default=0,
                   help="--local: layer jobs converted at once in worker processes (default 0: one per core, as many "
                        "as memory holds at 2.5 GiB each, and only with at least 4 jobs per worker)")
    p.add_argument("--expert-groups", type=positive_int, metavar="N",
                   help="cut each MoE layer's job into N jobs of consecutive experts and the non-layer job into up to N by "
                        "whole tensors, each writing its own shard, so "
                        "that more workers than layers stay busy (default: the flow splits when its Ray cluster holds "
                        "more jobs at once than there are layers; --local keeps layers whole)")
    p.add_argument("--unverified", action="store_true",
                   help="convert upstream files the Hub publishes no digest for (neither an LFS sha256 nor a git blob "
                        "id), unchecked; the terminal, the manifest (unverified_inputs) and the model card say so "
                        "(default: refuse them)")
    p.add_argument("--upstream-id", help="upstream model id recorded in the manifest (default: directory name)")
    p.add_argument("--revision", help="upstream revision recorded in the manifest")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, convert_flow: ConvertFlow | None = None) -> int:
    return convert(args.src, args.dst, args.recipe, local=args.local, convert_flow=convert_flow,
                   quark_version=args.quark_version, fused_excludes=args.fused_excludes,
                   shared_global_scale=args.shared_global_scale, overwrite=args.overwrite,
                   device=args.device, threads=args.threads, jobs=args.jobs, unverified=args.unverified,
                   upstream_id=args.upstream_id, revision=args.revision, expert_groups=args.expert_groups)


def convert(src: str, dst: str, recipe: str, *, local: bool, convert_flow: ConvertFlow | None,
            quark_version: str | None, fused_excludes: bool | None, overwrite: bool, device: str, threads: int,
            shared_global_scale: bool | None = None, expert_groups: int | None = None,
            jobs: int, unverified: bool, upstream_id: str | None, revision: str | None) -> int:
    """Convert with :func:`requant.convert` (``local``) or ``convert_flow``, and say on the terminal what was
    written."""
    import requant

    options = requant.ConvertOptions(quark_version=quark_version, fused_excludes=fused_excludes,
                                     shared_global_scale=shared_global_scale, device=device,
                                     threads=threads, jobs=jobs, overwrite=overwrite, unverified=unverified,
                                     upstream_id=upstream_id, revision=revision, expert_groups=expert_groups)
    if not local:
        if convert_flow is None:
            raise RequantError("convert without --local runs the requantize flow: use the `requant` command "
                               "(or python -m requant.flows.cli), or pass --local to convert in this process")
        if jobs:
            raise RequantError("--jobs sizes --local's worker processes; the flow runs one Ray task per layer job "
                               "(give it more CPUs with the flow's num_cpus)")
        summary = convert_flow(src, dst, recipe, options)
        _warn_unverified(src, summary.unverified_inputs)
        print(f"wrote {dst}: {summary.tensors} tensors, {summary.jobs} layer jobs ({summary.resumed} resumed)")
        return 0
    summary = requant.convert(src, dst, recipe, options)
    manifest = summary.manifest
    for warning in manifest["recipe"]["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    _warn_unverified(src, summary.unverified_inputs)
    resumed = (f" ({summary.resumed} of {summary.jobs} layer jobs resumed from an interrupted run)"
               if summary.resumed else "")
    print(f"wrote {dst}: {summary.tensors} tensors in "
          f"{sum(1 for f in manifest['outputs'] if f.endswith('.safetensors'))} shards{resumed}")
    return 0


def _warn_unverified(src: str, files) -> None:
    """One line on the terminal for a conversion that read inputs unchecked (``--unverified``)."""
    if files:
        print(f"warning: {src}: {len(files)} input files converted unverified (the Hub publishes no digest for "
              f"them; --unverified), e.g. {files[0]}; the manifest (unverified_inputs) and the model card say so",
              file=sys.stderr)
