"""One writer per output: a lease a run holds on its output while it writes there.

The lease is a series of small records, ``<lease dir>/<generation>.json``, in the storage that holds the
output (an S3 prefix or a local directory). Generation N+1 is created with a conditional write
(S3 ``If-None-Match: *``; ``O_EXCL`` locally), so of two runs that try to take the same generation exactly
one succeeds. The highest generation is the current holder. A record names its run key, host, PID and
start time, and carries a heartbeat the holder rewrites every ``ttl / 4`` seconds.

A second run on the same output fails at once with a :class:`LeaseHeld` error naming the holder. A lease
is stale when its holder is known dead (same host and boot: the PID is gone or belongs to another process)
or when its heartbeat is older than ``ttl`` (another host); a stale lease is taken over by writing the next
generation. A holder that finds a higher generation than its own has lost the lease (it was presumed dead)
and must stop writing: :meth:`Lease.check` raises :class:`LeaseLost`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from requant import settings
from requant.errors import RequantError

if TYPE_CHECKING:
    from requant.io.storage import WritableStorage



class LeaseHeld(RequantError):
    """Another live run holds the output."""


class LeaseLost(RequantError):
    """This run's lease was taken over; it must not write or publish."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> float | None:
    """Start time of a live process (None when it does not exist): tells a reused PID from the holder."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class Holder:
    generation: int
    run_key: str
    host: str
    boot_id: str
    pid: int
    pid_started: float
    started: float
    heartbeat: float
    ttl: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"run {self.run_key} on host {self.host}, pid {self.pid}, since {since}"

    def stale(self, now: float | None = None) -> bool:
        if self.host == socket.gethostname() and self.boot_id and self.boot_id == _boot_id():
            started = _process_start(self.pid)
            return started is None or abs(started - self.pid_started) > 1.0
        return (now or time.time()) - self.heartbeat > self.ttl


class Lease:
    """The lease of one run on one output. Use as a context manager: acquire, heartbeat, release."""

    def __init__(self, storage: WritableStorage, lease_dir: str, run_key: str, what: str, ttl: float | None = None):
        """``ttl``: seconds a heartbeat stays fresh; default ``$REQUANT_LEASE_TTL_SECONDS`` (120)."""
        self.storage, self.dir, self.run_key, self.what = storage, lease_dir.strip("/"), run_key, what
        self.ttl = settings.LEASE_TTL_SECONDS.get() if ttl is None else ttl
        self.generation: int | None = None
        self.took_over: Holder | None = None
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # --- records ------------------------------------------------------------------------------------
    def _path(self, generation: int) -> str:
        return f"{self.dir}/{generation:012d}.json"

    def _generations(self) -> list[int]:
        names = self.storage.list_files(self.dir)
        found = []
        for name in names:
            stem = name.rsplit("/", 1)[-1].removesuffix(".json")
            if name.endswith(".json") and stem.isdigit():
                found.append(int(stem))
        return sorted(found)

    def _read(self, generation: int) -> Holder | None:
        try:
            return Holder(**json.loads(self.storage.read_bytes(self._path(generation))))
        except RequantError:
            return None  # released (deleted) between list and read
        except (ValueError, TypeError) as exc:
            raise RequantError(f"{self.what}: unreadable lease record {self._path(generation)} ({exc})") from exc

    def _record(self, generation: int) -> bytes:
        pid = os.getpid()
        holder = Holder(generation, self.run_key, socket.gethostname(), _boot_id(), pid, _process_start(pid) or 0.0,
                        self._started, time.time(), self.ttl)
        return json.dumps(asdict(holder), sort_keys=True).encode()

    def current(self) -> Holder | None:
        generations = self._generations()
        return self._read(generations[-1]) if generations else None

    # --- life cycle ---------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        generations = self._generations()
        top = generations[-1] if generations else 0
        if generations:
            holder = self._read(top)
            if holder is not None and not holder.stale():
                raise LeaseHeld(f"{self.what}: another run is writing this output ({holder.describe()}); "
                                f"wait for it, or stop it")
            self.took_over = holder
        if not self.storage.put_bytes(self._path(top + 1), self._record(top + 1), if_none_match=True):
            winner = self._read(top + 1)
            raise LeaseHeld(f"{self.what}: another run took this output first"
                            f"{f' ({winner.describe()})' if winner else ''}")
        self.generation = top + 1
        for old in generations:                       # records of dead holders: nobody needs them any more
            self.storage.delete(self._path(old))
        self._thread = threading.Thread(target=self._beat, name="requant-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                newest = self._generations()
                if newest and newest[-1] != self.generation:
                    self._lost = f"generation {newest[-1]} replaced ours ({self.generation})"
                    return
                self.storage.put_bytes(self._path(self.generation), self._record(self.generation))
            except Exception:  # noqa: BLE001 - a missed beat only shortens the margin; check() decides
                continue

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease (call before publishing)."""
        if self._lost is None:
            newest = self._generations()
            if not newest or newest[-1] != self.generation:
                self._lost = f"the lease is now generation {newest[-1] if newest else 'none'}, ours was {self.generation}"
        if self._lost:
            raise LeaseLost(f"{self.what}: this run lost its lease ({self._lost}): another run took over the "
                            f"output, so this one stops without publishing")

    def release(self) -> None:
        """Stop the heartbeat and delete our record. Best effort: it runs on the way out of errors it must
        not replace, and a record left behind is stale (dead PID, then an old heartbeat) for the next run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.generation is not None and self._lost is None:
                newest = self._generations()
                if newest and newest[-1] == self.generation:
                    self.storage.delete(self._path(self.generation))
        except Exception:  # noqa: BLE001 - see the docstring
            pass
        self.generation = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def current_generation(storage: WritableStorage, lease_dir: str) -> int | None:
    """The newest lease generation at ``lease_dir`` (workers compare it with the one their run holds)."""
    return (Lease(storage, lease_dir, "", "")._generations() or [None])[-1]
