"""Where the CPU time of a benchmark run goes, for runs made of several processes (a flow run: its driver, a
local Ray's workers and services, Prefect's server; the S3 server it talks to).

:class:`CpuSampler` reads ``/proc`` in a thread while the run lasts: every process that descends from the
given roots is attributed to a part (the root's name, or a part named by ``classify`` from its command line),
and the busy time of the whole machine is taken from ``/proc/stat`` over the same window. Each process's CPU
time is its latest sample, so a process that lives less than one interval may be missed and one that ends
loses at most one interval: the parts are a lower bound, within an interval per process. Linux only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        out[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_part(cmdline: str) -> str | None:
    """Names the processes of a local Ray: its workers (which run the tasks) apart from its services."""
    if "default_worker.py" in cmdline or "setup_worker.py" in cmdline or cmdline.startswith("ray::"):
        return "ray workers"
    if "/ray/" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline:
        return "ray services"
    if "prefect.server" in cmdline or "uvicorn" in cmdline:
        return "prefect server"
    return None


class CpuSampler:
    """CPU seconds per part of a multi-process run, and the machine's busy share, over a ``with`` block.

    ``roots``: part name -> pid. The roots' CPU counts from the start of the block; their descendants' from
    their own start (a descendant is in the block's run by construction). ``classify(cmdline)`` may name a
    descendant's part (else it is its root's).
    """

    def __init__(self, roots: dict[str, int], classify: Callable[[str], str | None] | None = None,
                 interval: float = 0.2):
        self.roots = dict(roots)
        self.classify = classify
        self.interval = interval
        self._part: dict[int, str] = {}       # pid -> part
        self._base: dict[int, float] = {}     # pid -> CPU seconds when first seen (roots only; else 0)
        self._last: dict[int, float] = {}     # pid -> CPU seconds at the latest sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="requant-cpu-sampler", daemon=True)
        self.wall = 0.0
        self.machine: tuple[int, int] = (0, 0)

    def __enter__(self) -> CpuSampler:
        self._start_wall = time.perf_counter()
        self._start_busy = _busy_jiffies()
        procs = _processes()
        for part, pid in self.roots.items():
            if pid in procs:
                self._part[pid] = part
                self._base[pid] = self._last[pid] = procs[pid][1]
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self._start_wall
        busy, total = _busy_jiffies()
        self.machine = (busy - self._start_busy[0], total - self._start_busy[1])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        procs = _processes()
        grew = True
        while grew:  # attach children whose parent is attributed (parents are listed in no particular order)
            grew = False
            for pid, (ppid, _cpu) in procs.items():
                if pid in self._part or ppid not in self._part:
                    continue
                part = (self.classify(_cmdline(pid)) if self.classify else None) or self._part[ppid]
                self._part[pid], self._base[pid] = part, 0.0
                grew = True
        for pid in self._part:
            if pid in procs:
                self._last[pid] = procs[pid][1]

    def seconds(self) -> dict[str, float]:
        """CPU seconds per part, largest first."""
        parts: dict[str, float] = {}
        for pid, part in self._part.items():
            parts[part] = parts.get(part, 0.0) + self._last.get(pid, 0.0) - self._base.get(pid, 0.0)
        return dict(sorted(parts.items(), key=lambda kv: -kv[1]))

    def summary(self) -> dict:
        """Wall seconds, CPU seconds per part and in all, and the machine's busy share (all of its cores)."""
        busy, total = self.machine
        parts = self.seconds()
        return {"wall_seconds": self.wall, "cpu_seconds": {k: round(v, 2) for k, v in parts.items()},
                "cpu_seconds_total": round(sum(parts.values()), 2),
                "machine_busy": busy / total if total else 0.0, "cores": os.cpu_count() or 1}
