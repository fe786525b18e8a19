"""Sizing a plan's jobs for a cluster: how a plan's jobs fill ``W`` workers, and into how many expert groups to cut
each MoE layer's job (:func:`requant.planning.split_plan`) so that more workers than layers stay busy.

A schedule starts each job, in plan order, on the first worker free, as the requantize flow submits them to Ray;
a job's duration is its share of the work at its worker's rate. The split chosen is the one whose simulated wall
time is shortest (the fewest groups among equals), which does not depend on the rate when every worker has the same.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from requant.planning import LayerJob, job_shapes, split_sizes


@dataclass(frozen=True)
class Schedule:
    """Jobs run on ``workers``: when the last finishes, the longest job, and the workers' idle share until then."""

    workers: int
    jobs: int
    makespan: float
    longest_job: float
    idle_share: float


def simulate(seconds: Sequence[float], workers: int) -> Schedule:
    """Jobs of the given durations, each started in order on the first worker free (a worker takes one job at a
    time): the finish time of the last, and the share of worker time spent idle until then."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
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


def best_split(sizes: dict[int, list[int]], workers: int, rate: float = 1.0) -> tuple[int, Schedule]:
    """Of the splits in ``sizes`` (expert groups per MoE layer -> the jobs' input bytes, in plan order), the one whose
    simulated wall time on ``workers`` at ``rate`` bytes/s is shortest (the fewest groups among equals)."""
    schedules = {parts: simulate([b / rate for b in jobs], workers) for parts, jobs in sizes.items()}
    shortest = min(s.makespan for s in schedules.values()) or 1.0
    parts = min(schedules, key=lambda p: (round(schedules[p].makespan / shortest, 9), p))  # equal up to rounding
    return parts, schedules[parts]


def candidate_parts(workers: int, moe_layers: int) -> range:
    """Expert groups per MoE layer worth simulating on ``workers``: up to twice what gives every worker a job."""
    return range(1, 2 * -(-workers // max(moe_layers, 1)) + 1)


def moe_layers(jobs: Sequence[LayerJob]) -> int:
    """The jobs holding routed experts, which :func:`requant.planning.split_jobs` cuts into expert groups."""
    return sum(1 for shape in job_shapes(tuple(jobs)) if shape.experts)


def expert_groups_for(jobs: Sequence[LayerJob], workers: int) -> int:
    """How many expert groups to cut each MoE layer's job into for ``workers``: 1 (whole) unless the workers
    outnumber the jobs, else the split whose simulated wall time is shortest."""
    if workers <= len(jobs):
        return 1
    moe = moe_layers(jobs)
    if not moe:
        return 1
    shapes = job_shapes(tuple(jobs))
    return best_split({p: split_sizes(shapes, p) for p in candidate_parts(workers, moe)}, workers)[0]
