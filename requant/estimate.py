"""The projection a user asks first: how long converting a checkpoint takes on ``W`` workers of ``C`` cores with
``B`` GB/s of storage, and how much memory each worker needs (``requant plan --estimate``).

It combines the plan (every job's input and output bytes, split as the flow would split it,
:func:`requant.sizing.expert_groups_for`) with what ``make bench-layer`` measured on one machine (the MoE layer's
job on 1 thread and on every core, and the conversion's peak memory). Every assumption it makes is returned with it:

- a worker's rate on ``C`` cores follows Amdahl's law fitted to the measured speedup from 1 thread to every core
  of the machine measured (the share of a job that runs in parallel), from the measured 1-thread rate;
- storage is one pool of ``B`` GB/s shared evenly by the jobs running at that moment, each moving its input and
  its output through it; a job runs at the slower of its worker's rate and its share of storage;
- jobs start in plan order on the first worker free, as the flow submits them;
- a worker's peak memory grows with its threads as measured from 1 thread to every core, whatever its job's
  size (jobs stream their tensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from requant.errors import RequantError
from requant.planning import Plan, split_plan
from requant.sizing import expert_groups_for


@dataclass(frozen=True)
class Measured:
    """What ``make bench-layer`` measured on the machine ``where`` describes: the MoE layer's job alone, MB/s in on 1
    thread and on ``threads`` (every core there), and the conversion's peak RSS on each."""

    job_mb_s_1: float
    job_mb_s_n: float
    threads: int
    peak_rss_mb_1: float
    peak_rss_mb_n: float
    where: str

    def __post_init__(self) -> None:
        if self.threads < 2:
            raise ValueError(f"{self.where}: measured on {self.threads} thread(s); the scaling needs 2 or more")

    @property
    def parallel_share(self) -> float:
        """Amdahl's parallel share p of a job, from its speedup s on n threads: s = 1 / ((1 - p) + p / n)."""
        speedup = self.job_mb_s_n / self.job_mb_s_1
        return min(max((1 - 1 / speedup) / (1 - 1 / self.threads), 0.0), 1.0)

    def rate_mb_s(self, cores: int) -> float:
        """A worker's MB/s in on ``cores`` threads, by Amdahl's law from the 1-thread rate."""
        p = self.parallel_share
        return self.job_mb_s_1 / ((1 - p) + p / cores)

    def peak_rss_mb(self, cores: int) -> float:
        """A worker's peak RSS on ``cores`` threads, growing by the measured amount per thread."""
        return self.peak_rss_mb_1 + (self.peak_rss_mb_n - self.peak_rss_mb_1) / (self.threads - 1) * (cores - 1)

    def rate_basis(self) -> str:
        """Where a worker's rate comes from, in words."""
        return (f"Amdahl's law with a parallel share of {self.parallel_share:.2f} (the MoE layer's job at "
                f"{self.job_mb_s_1:.0f} MB/s in on 1 thread, {self.job_mb_s_n:.0f} on {self.threads}; {self.where})")

    def memory_basis(self) -> str:
        """Where a worker's peak memory comes from, in words."""
        return (f"{self.peak_rss_mb_1:.0f} MB measured on 1 thread, {self.peak_rss_mb(2) - self.peak_rss_mb_1:+.0f} MB "
                f"per further thread, whatever the job's size")


def measured_from_layer_results(path: Path) -> Measured:
    """The figures of a ``results/layer.json`` (``make bench-layer``): its tmpfs runs on 1 thread and every core.
    A missing or foreign file is a :class:`requant.errors.RequantError` naming it."""
    if not Path(path).is_file():
        raise RequantError(f"{path}: no make bench-layer results to estimate from (run make bench-layer, or pass "
                           f"--layer-results)")
    try:
        data = json.loads(Path(path).read_text())
        tmpfs, run = data["tmpfs"], data["run"]
        threads = max(map(int, tmpfs["stages"]))
        rates = []
        for n in (1, threads):
            job = tmpfs["stages"][str(n)]["largest_job"]
            rates.append(job["bytes_in"] / job["seconds"] / 1e6)
        where = (f"{path}: make bench-layer of {run['date']}, requant {run.get('commit', '?')[:7]}, "
                 f"{run.get('cpu', '?')} ({run.get('cores', '?')} cores)")
        return Measured(rates[0], rates[1], threads, tmpfs["requant_1_core"]["peak_rss_mb"],
                        tmpfs["requant"]["peak_rss_mb"], where)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise RequantError(f"{path}: not the results of make bench-layer ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class Fleet:
    """``workers`` layer jobs at once, each on ``cores`` cores; ``storage_gb_s``: what the storage gives all of
    them together (None: it keeps up with every worker)."""

    workers: int
    cores: int
    storage_gb_s: float | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cores < 1:
            raise ValueError(f"workers and cores must be at least 1, got {self.workers} and {self.cores}")
        if self.storage_gb_s is not None and self.storage_gb_s <= 0:
            raise ValueError(f"storage must give more than 0 GB/s, got {self.storage_gb_s}")


@dataclass(frozen=True)
class Estimate:
    """What converting a plan on a fleet is projected to take, and the assumptions the projection rests on."""

    fleet: Fleet
    jobs: int
    expert_groups: int
    bytes_in: int
    bytes_out: int
    wall_s: float
    longest_job_s: float
    worker_mb_s: float  # a worker's rate on its cores, storage aside
    storage_bound_share: float  # share of the wall time during which storage, not the cores, set the pace
    idle_share: float
    peak_memory_gb: float  # per worker
    assumptions: tuple[str, ...] = field(default=())


def estimate(plan: Plan, fleet: Fleet, measured: Measured) -> Estimate:
    """The wall time and per-worker memory of converting ``plan``'s jobs as they are (split or whole: see
    :func:`sized_for`) on ``fleet``, at ``measured``'s rates."""
    rate = measured.rate_mb_s(fleet.cores) * 1e6
    storage = fleet.storage_gb_s * 1e9 if fleet.storage_gb_s else None
    wall, longest, bound, idle = _run(plan, fleet.workers, rate, storage)
    assumptions = (
        f"per worker {measured.rate_mb_s(fleet.cores):.0f} MB/s in on {fleet.cores} cores: {measured.rate_basis()}",
        ("storage keeps up with every worker" if storage is None else
         f"storage: {fleet.storage_gb_s:g} GB/s shared evenly by the jobs running, each moving its input and its "
         f"output"),
        "jobs start in plan order on the first worker free, as the requantize flow submits them; "
        + (f"each MoE layer in {plan.expert_groups} expert groups, the non-layer job in up to as many parts"
           if plan.expert_groups > 1 else "layers whole"),
        f"peak memory per worker: {measured.memory_basis()}",
    )
    return Estimate(fleet, len(plan.jobs), plan.expert_groups, sum(j.bytes_in for j in plan.jobs),
                    sum(j.bytes_out for j in plan.jobs), wall, longest, rate / 1e6, bound / wall if wall else 0.0,
                    idle / (fleet.workers * wall) if wall else 0.0, measured.peak_rss_mb(fleet.cores) / 1e3,
                    assumptions)


def sized_for(plan: Plan, workers: int) -> Plan:
    """``plan`` split as the requantize flow splits it on a cluster holding ``workers`` jobs at once."""
    return split_plan(plan, expert_groups_for(plan.jobs, workers))


def _run(plan: Plan, workers: int, rate: float, storage: float | None) -> tuple[float, float, float, float]:
    """Jobs started in order on the first free of ``workers``, each progressing (in input bytes per second) at
    ``rate`` or at its share of ``storage`` moving its input and output, whichever is slower: the wall time, the
    longest job, the time storage set the pace, and the worker-seconds without a job."""
    pending = [(job.bytes_in, (job.bytes_in + job.bytes_out) / max(job.bytes_in, 1)) for job in plan.jobs]
    pending.reverse()
    running: list[list[float]] = []  # [input bytes left, storage bytes per input byte, start]
    now = longest = bound = idle = 0.0
    while pending or running:
        while pending and len(running) < workers:
            left, traffic = pending.pop()
            running.append([float(left), traffic, now])
        speeds = [rate if storage is None else min(rate, storage / (len(running) * traffic))
                  for _, traffic, _ in running]
        step = min(left / speed for (left, _, _), speed in zip(running, speeds))
        if any(speed < rate for speed in speeds):
            bound += step
        idle += (workers - len(running)) * step
        now += step
        for job, speed in zip(running, speeds):
            job[0] -= speed * step
        for job in [j for j in running if j[0] <= 1e-6 * rate]:
            longest = max(longest, now - job[2])
            running.remove(job)
    return now, longest, bound, idle


def render(result: Estimate) -> str:
    """What ``requant plan --estimate`` prints."""
    f = result.fleet
    storage = f"{f.storage_gb_s:g} GB/s of storage" if f.storage_gb_s else "storage that keeps up"
    lines = [f"estimate: {f.workers} workers of {f.cores} cores, {storage}",
             f"  wall time       {duration(result.wall_s)} ({result.jobs} jobs, {result.bytes_in / 1e9:.1f} GB in, "
             f"{result.bytes_out / 1e9:.1f} GB out; the longest job {duration(result.longest_job_s)})",
             f"  per worker      {result.worker_mb_s:.0f} MB/s in, peak memory {result.peak_memory_gb:.1f} GB",
             f"  storage-bound   {100 * result.storage_bound_share:.0f}% of the time; workers idle "
             f"{100 * result.idle_share:.0f}%",
             "assumptions:"]
    lines += [f"  - {a}" for a in result.assumptions]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: s, min or h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
