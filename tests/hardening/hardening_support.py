"""Shared state of the hardening suite (a uniquely named module; conftest.py only wires it to pytest).

Hardening suite: counts of inputs tried / faults injected / outcomes go into hardening.json in the run's artifacts
folder (tests/artifacts.py), which `make hardening` prints as a table. REQUANT_HARDENING=full (make hardening) runs the full counts;
the default (CI) runs a shorter seed count of the same tests."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from artifacts import artifacts_dir  # noqa: E402

REPORT_NAME = "hardening.json"

FULL = os.environ.get("REQUANT_HARDENING") == "full"
_rows: dict[str, dict] = defaultdict(lambda: {"tried": 0, "outcomes": Counter(), "lost": 0, "notes": []})


def scale(ci: int, full: int) -> int:
    return full if FULL else ci


class Ledger:
    """What one area of the suite did: inputs tried, outcome counts, anything lost (must stay 0)."""

    def record(self, area: str, outcome: str, lost: bool = False) -> None:
        if not _rows:
            atexit.register(write_report)  # also when only tests outside tests/hardening recorded something
        row = _rows[area]
        row["tried"] += 1
        row["outcomes"][outcome] += 1
        row["lost"] += int(lost)

    def note(self, area: str, text: str) -> None:
        _rows[area]["notes"].append(text)


def write_report() -> None:
    if not _rows:
        return
    (artifacts_dir() / REPORT_NAME).write_text(json.dumps({"scale": "full" if FULL else "ci", "areas": {
        area: {"tried": r["tried"], "outcomes": dict(r["outcomes"]), "lost": r["lost"], "notes": r["notes"]}
        for area, r in sorted(_rows.items())}}, indent=2) + "\n")


# tmpfs mounts the suite made and has not unmounted yet (test_os_failures.tmpfs); emptied at session end.
MOUNTS: set[Path] = set()


def mounted(path: Path) -> bool:
    target = str(Path(path).resolve())
    return any(line.split()[1] == target for line in Path("/proc/mounts").read_text().splitlines())


def unmount(path: Path) -> None:
    """Unmount ``path`` for real: a process still closing files there makes umount fail with EBUSY for a moment,
    so retry for a few seconds; raise if it stays mounted (a leaked mount would outlive the test run)."""
    deadline = time.monotonic() + 10
    while mounted(path):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path}: still mounted after 10 s of umount attempts")
            time.sleep(0.2)
    MOUNTS.discard(path)


def unmount_all() -> None:
    for path in list(MOUNTS):
        unmount(path)
