"""``requant bench cluster`` / ``make bench-cluster``: Kimi-K2.6's real plan on 8 to 512 workers, its layer jobs
whole and split into expert groups (:func:`requant.planning.split_jobs`), simulated.

The plan is the real one: ``synth --profile k26 --layout-only`` writes K2.6's 64 shards as headers over holes (61
layers, 384 routed experts, real widths and vocabulary), and :func:`requant.planning.build_plan` plans it as it would
the published model. Each job is then given to the first free worker in plan order, as the requantize flow submits
them to Ray, and takes its input bytes over the per-worker rate measured by ``make bench-layer`` (the MoE layer's job
on every core of this machine, ``results/layer.json``). The simulation assumes that rate holds for every job and
that storage keeps up with every worker at once; what it shows is how the plan's shape sets the critical path and
the idle share as workers are added, with the layers whole and split as the simulation finds fastest.
"""

from __future__ import annotations

import heapq
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requant.bench.provenance import describe, run_info, write_results

MEASURES = ("requant/planning.py", "requant/bench/cluster.py", "requant/testing/synth.py", "requant/layout.py")
WORKERS = (8, 16, 32, 61, 64, 128, 256, 512)
RECIPE = "amd-kimi-mxfp4"


@dataclass(frozen=True)
class Schedule:
    """A plan's jobs run on ``workers``: when the last finishes, the longest job, and the workers' idle share."""

    workers: int
    jobs: int
    makespan: float
    longest_job: float
    idle_share: float


def simulate(seconds: list[float], workers: int) -> Schedule:
    """Jobs of the given durations, each started in order on the first worker free (a worker takes one job at a
    time): the finish time of the last, and the share of worker time spent idle until then."""
    free = [0.0] * workers
    heapq.heapify(free)
    finish = 0.0
    for duration in seconds:
        start = heapq.heappop(free)
        heapq.heappush(free, start + duration)
        finish = max(finish, start + duration)
    busy = sum(seconds)
    idle = 1 - busy / (workers * finish) if finish else 0.0
    return Schedule(workers, len(seconds), finish, max(seconds, default=0.0), idle)


def best_split(sizes: dict[int, list[int]], workers: int, rate: float) -> tuple[int, Schedule]:
    """Of the splits in ``sizes`` (expert groups per MoE layer -> the jobs' input bytes, in plan order), the one whose
    simulated wall time on ``workers`` at ``rate`` bytes/s is shortest (the fewest groups among equals)."""
    schedules = {parts: simulate([b / rate for b in jobs], workers) for parts, jobs in sizes.items()}
    parts = min(schedules, key=lambda p: (round(schedules[p].makespan, 6), p))
    return parts, schedules[parts]


def candidate_parts(workers: int, moe_layers: int) -> range:
    """Expert groups per MoE layer worth simulating on ``workers``: up to twice what gives every worker a job."""
    return range(1, 2 * -(-workers // moe_layers) + 1)


def run_cluster_bench(rate_mb_s: float, rate_from: str, out: str | None = None,
                      workers: tuple[int, ...] = WORKERS, upstream: Path | None = None) -> dict[str, Any]:
    """The simulation over K2.6's plan (``upstream``: a ``k26 --layout-only`` synth, made in a temporary directory
    when None) at ``rate_mb_s`` per worker; cluster.json and cluster.md into ``out``."""
    from requant.io.storage import LocalDir
    from requant.planning import build_plan, split_jobs
    from requant.recipe import load_recipe
    from requant.testing.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="requant-bench-cluster-") as tmp:
        if upstream is None:
            upstream = synthesize(Path(tmp) / "k26", "k26", progress=False, layout_only=True)
        plan = build_plan(LocalDir(upstream), load_recipe(RECIPE))
    moe_layers = sum(1 for job in plan.jobs if any(".mlp.experts." in t.name for t in job.tasks))
    sizes: dict[int, list[int]] = {}
    largest: dict[int, str] = {}  # expert groups -> the name of the largest job
    rate = rate_mb_s * 1e6
    rows = []
    for w in workers:
        for parts in candidate_parts(w, moe_layers):
            if parts not in sizes:
                jobs = split_jobs(plan.jobs, parts)
                sizes[parts] = [job.bytes_in for job in jobs]
                largest[parts] = max(jobs, key=lambda job: job.bytes_in).name
        whole = simulate([b / rate for b in sizes[1]], w)
        parts, split = best_split({p: sizes[p] for p in candidate_parts(w, moe_layers)}, w, rate)
        rows.append({"workers": w, "parts": parts, **{label: {
            "jobs": s.jobs, "makespan_s": s.makespan, "longest_job_s": s.longest_job, "longest_job": largest[k],
            "idle_share": s.idle_share} for label, s, k in (("whole", whole, 1), ("split", split, parts))}})
    results = {"run": run_info(measures=MEASURES), "recipe": RECIPE, "rate_mb_s": rate_mb_s, "rate_from": rate_from,
               "bytes_in": sum(sizes[1]), "jobs": len(sizes[1]), "moe_layers": moe_layers,
               "largest_job_bytes": max(sizes[1]), "rows": rows}
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
                  "submits them. Split: each MoE layer cut into the number of expert groups (1 to twice what gives "
                  "every worker a job) whose simulated wall time is shortest.", "",
              f"Planned {describe(results['run'])}" if "run" in results else ""]
    return "\n".join(lines).rstrip() + "\n"


def rate_from_layer_results(path: Path) -> tuple[float, str]:
    """The per-worker rate ``make bench-layer`` measured: the MoE layer's job alone on every core, on tmpfs."""
    data = json.loads(path.read_text())
    profiles = data["tmpfs"]["stages"]
    cores = str(max(map(int, profiles)))
    job = profiles[cores]["largest_job"]
    return job["bytes_in"] / job["seconds"] / 1e6, (f"the MoE layer's job on {cores} cores, tmpfs, "
                                                     f"results/layer.json of {data['run']['date'][:10]}")
