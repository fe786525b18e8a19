"""``requant plan``: what converting a checkpoint would do, read from its headers alone, and with ``--estimate``
how long it would take on a cluster and how much memory each worker needs (:mod:`requant.estimate`)."""

from __future__ import annotations

import argparse

from requant.cli._arguments import positive_float, positive_int

DEFAULT_LAYER_RESULTS = "results/layer.json"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plan", help="plan a conversion from the headers alone; --estimate: its time on a cluster")
    p.add_argument("src", help="the upstream: a directory, s3://bucket/prefix or hf://org/repo@revision (only its "
                               "config, index and shard headers are read)")
    p.add_argument("--recipe", required=True, help="built-in recipe name or path to a recipe YAML")
    p.add_argument("--expert-groups", type=positive_int, metavar="N",
                   help="cut each MoE layer's job into N jobs of consecutive experts, the non-layer job into up to N by "
                        "whole tensors (default: as the flow would for "
                        "--workers, else whole)")
    p.add_argument("--estimate", action="store_true",
                   help="project the wall time and each worker's peak memory on --workers workers of --cores cores")
    p.add_argument("--workers", type=positive_int, default=8, help="layer jobs running at once (default 8)")
    p.add_argument("--cores", type=positive_int, default=16, help="cores of each worker (default 16)")
    p.add_argument("--storage-gb-s", type=positive_float, metavar="B",
                   help="GB/s the storage gives all workers together (default: it keeps up with every worker)")
    p.add_argument("--layer-results", default=DEFAULT_LAYER_RESULTS, metavar="PATH",
                   help=f"the rates make bench-layer measured (default {DEFAULT_LAYER_RESULTS})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return plan(args.src, args.recipe, expert_groups=args.expert_groups, estimate=args.estimate,
                workers=args.workers, cores=args.cores, storage_gb_s=args.storage_gb_s,
                layer_results=args.layer_results)


def plan(src: str, recipe: str, *, expert_groups: int | None, estimate: bool, workers: int, cores: int,
         storage_gb_s: float | None, layer_results: str) -> int:
    from pathlib import Path

    import requant
    from requant.estimate import measured_from_layer_results
    from requant.planning import split_plan
    from requant.run import human_bytes

    # the measurements first: a missing file fails before the headers are read
    measured = measured_from_layer_results(Path(layer_results)) if estimate else None
    planned = requant.plan(src, recipe)
    if expert_groups:
        planned = split_plan(planned, expert_groups)
    elif estimate:
        from requant.estimate import sized_for

        planned = sized_for(planned, workers)  # as the flow would split it for that many workers
    groups = planned.expert_groups
    largest = max(planned.jobs, key=lambda job: job.bytes_in)
    split = f", split in {groups} (each MoE layer by experts, the non-layer job by tensors)" if groups > 1 else ""
    print(f"{src}: {len(planned.jobs)} jobs with recipe {planned.recipe.name}{split}: "
          f"{human_bytes(sum(j.bytes_in for j in planned.jobs))} in, {human_bytes(sum(j.bytes_out for j in planned.jobs))} "
          f"out, {sum(len(j.specs) for j in planned.jobs)} tensors; the largest job {largest.name} "
          f"({human_bytes(largest.bytes_in)} in)")
    for warning in planned.recipe.warnings:
        print(f"warning: {warning}")
    if measured is not None:
        from requant.estimate import Fleet, render
        from requant.estimate import estimate as project

        print(render(project(planned, Fleet(workers, cores, storage_gb_s), measured)))
    return 0
