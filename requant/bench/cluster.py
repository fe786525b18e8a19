"""``requant bench cluster`` / ``make bench-cluster``: Kimi-K2.6's real plan on 8 to 512 workers, its layer jobs
whole and split into expert groups (:func:`requant.planning.split_jobs`), simulated.

The plan is the real one: ``synth --profile k26 --layout-only`` writes K2.6's 64 shards as headers over holes (61
layers, 384 routed experts, real widths and vocabulary), and :func:`requant.planning.build_plan` plans it as it would
the published model. Each job is then given to the first free worker in plan order, as the requantize flow submits
them to Ray, and takes its input bytes over the per-worker rate measured by ``make bench-layer`` (the MoE layer's job
on every core of this machine, ``results/layer.json``). The simulation assumes that rate holds for every job and
that storage keeps up with every worker at once; what it shows is how the plan's shape sets the critical path and
the idle share as workers are added, with the layers whole and split as the flow splits them.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from requant.bench.provenance import describe, run_info, write_results
from requant.estimate import Estimate, Fleet, Measured, duration, estimate, sized_for
from requant.sizing import expert_groups_for, moe_layers, simulate

MEASURES = ("requant/planning.py", "requant/sizing.py", "requant/estimate.py", "requant/bench/cluster.py", "requant/testing/synth.py",
            "requant/layout.py")
WORKERS = (8, 16, 32, 61, 64, 128, 256, 512)
RECIPE = "amd-kimi-mxfp4"
# Fleets for the estimate (requant plan --estimate): MI350X nodes of 96 cores (infra/), each layer job on 16 or 8 of
# them; storage as a pool, from one node's NVMe to a parallel filesystem or object store; None: it keeps up.
FLEETS = ((6, 16, 10.0), (48, 16, 40.0), (96, 8, 40.0), (96, 16, 80.0), (384, 16, 200.0), (384, 16, None))


def run_cluster_bench(measured: Measured, out: str | None = None, workers: tuple[int, ...] = WORKERS,
                      upstream: Path | None = None, fleets: tuple = FLEETS) -> dict[str, Any]:
    """The simulation over K2.6's plan (``upstream``: a ``k26 --layout-only`` synth, made in a temporary directory
    when None) at the per-worker rate ``measured`` on every core, and the estimate for each of ``fleets``
    (workers, cores, storage GB/s); cluster.json and cluster.md into ``out``."""
    from requant.io.storage import LocalDir
    from requant.planning import build_plan, split_jobs
    from requant.recipe import load_recipe
    from requant.testing.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="requant-bench-cluster-") as tmp:
        if upstream is None:
            upstream = synthesize(Path(tmp) / "k26", "k26", progress=False, layout_only=True)
        plan = build_plan(LocalDir(upstream), load_recipe(RECIPE))
    moe = moe_layers(plan.jobs)
    sizes: dict[int, list[int]] = {}
    largest: dict[int, str] = {}  # expert groups -> the name of the largest job
    rate_mb_s = measured.job_mb_s_n
    rate = rate_mb_s * 1e6
    rows = []
    for w in workers:
        parts = expert_groups_for(plan.jobs, w)  # as the flow chooses
        for k in {1, parts} - set(sizes):
            jobs = split_jobs(plan.jobs, k)
            sizes[k] = [job.bytes_in for job in jobs]
            largest[k] = max(jobs, key=lambda job: job.bytes_in).name
        whole, split = (simulate([b / rate for b in sizes[k]], w) for k in (1, parts))
        rows.append({"workers": w, "parts": parts, **{label: {
            "jobs": s.jobs, "makespan_s": s.makespan, "longest_job_s": s.longest_job, "longest_job": largest[k],
            "idle_share": s.idle_share} for label, s, k in (("whole", whole, 1), ("split", split, parts))}})
    estimates = [estimate(sized_for(plan, w), Fleet(w, c, b), measured) for w, c, b in fleets]
    results = {"run": run_info(measures=MEASURES), "recipe": RECIPE, "rate_mb_s": rate_mb_s,
               "rate_from": f"the MoE layer's job on {measured.threads} cores, tmpfs, {measured.where}",
               "bytes_in": sum(sizes[1]), "jobs": len(sizes[1]), "moe_layers": moe,
               "largest_job_bytes": max(sizes[1]), "rows": rows, "measured": dataclasses.asdict(measured),
               "estimates": [_estimate_row(e) for e in estimates]}
    write_results(out, "cluster", results, render(results))
    return results


def render(results: dict[str, Any]) -> str:
    lines = [f"## Kimi-K2.6's plan on a cluster: {results['jobs']} jobs, {results['bytes_in'] / 1e9:.0f} GB in "
             f"({results['moe_layers']} MoE layers; the largest job {results['largest_job_bytes'] / 1e9:.1f} GB), "
             f"recipe {results['recipe']}", "",
             "| workers | expert groups per MoE layer | jobs: whole / split | wall s: whole | wall s: split | "
             "split / whole | longest job s: whole / split | idle share: whole | idle share: split |",
             "|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for row in results["rows"]:
        whole, split = row["whole"], row["split"]
        lines.append(f"| {row['workers']} | {row['parts']} | {whole['jobs']} / {split['jobs']} | "
                     f"{whole['makespan_s']:.0f} | {split['makespan_s']:.0f} | "
                     f"{whole['makespan_s'] / split['makespan_s']:.2f}x | "
                     f"{whole['longest_job_s']:.0f} ({whole['longest_job']}) / {split['longest_job_s']:.0f} "
                     f"({split['longest_job']}) | {100 * whole['idle_share']:.0f}% | {100 * split['idle_share']:.0f}% |")
    lines += ["", f"Each worker converts at {results['rate_mb_s']:.0f} MB/s in ({results['rate_from']}); storage is "
                  "taken to keep up with every worker; jobs start in plan order on the first free worker, as the flow "
                  "submits them. Split: as the flow splits (requant.sizing.expert_groups_for): whole while the jobs "
                  "outnumber the workers, else each MoE layer cut into the number of expert groups (1 to twice what "
                  "gives every worker a job) whose simulated wall time is shortest.", "",
              *_render_estimates(results),
              f"Planned {describe(results['run'])}" if "run" in results else ""]
    return "\n".join(lines).rstrip() + "\n"


def _estimate_row(e: Estimate) -> dict[str, Any]:
    return {"workers": e.fleet.workers, "cores": e.fleet.cores, "storage_gb_s": e.fleet.storage_gb_s,
            "expert_groups": e.expert_groups, "jobs": e.jobs, "wall_s": e.wall_s, "longest_job_s": e.longest_job_s,
            "worker_mb_s": e.worker_mb_s, "storage_bound_share": e.storage_bound_share, "idle_share": e.idle_share,
            "peak_memory_gb": e.peak_memory_gb}


def _render_estimates(results: dict[str, Any]) -> list[str]:
    if not results.get("estimates"):
        return []
    m = Measured(**results["measured"])
    lines = ["### The estimate: `requant plan --estimate`", "",
             "| workers × cores | storage GB/s | expert groups | jobs | wall | longest job | per worker MB/s | "
             "storage-bound | idle | peak memory per worker |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results["estimates"]:
        storage = f"{e['storage_gb_s']:g}" if e["storage_gb_s"] else "keeps up"
        lines.append(f"| {e['workers']} × {e['cores']} | {storage} | {e['expert_groups']} | {e['jobs']} | "
                     f"{duration(e['wall_s'])} | {duration(e['longest_job_s'])} | {e['worker_mb_s']:.0f} | "
                     f"{100 * e['storage_bound_share']:.0f}% | {100 * e['idle_share']:.0f}% | "
                     f"{e['peak_memory_gb']:.1f} GB |")
    lines += ["", "Workers of C cores on MI350X-sized nodes (96 cores, `infra/`), storage as one pool. The estimate's "
                  "assumptions, as `requant plan --estimate` prints them:", "",
              f"- a worker's rate on C cores: {m.rate_basis()};",
              "- storage: the GB/s given, shared evenly by the jobs running, each moving its input and its output "
              "(\"keeps up\": no limit); a job runs at the slower of its worker's rate and its share;",
              "- jobs start in plan order on the first worker free, split as the flow splits them for that many workers;",
              f"- peak memory per worker: {m.memory_basis()}.", ""]
    return lines


