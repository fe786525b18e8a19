"""Shared state of the hardening suite (a uniquely named module; conftest.py only wires it to pytest).

Hardening suite: counts of inputs tried / faults injected / outcomes go into test-artifacts/hardening.json,
which `make hardening` prints as a table. REQUANT_HARDENING=full (make hardening) runs the full counts;
the default (CI) runs a shorter seed count of the same tests."""

from __future__ import annotations

import atexit
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

FULL = os.environ.get("REQUANT_HARDENING") == "full"
REPORT = Path(__file__).resolve().parents[2] / "test-artifacts" / "hardening.json"
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
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps({"scale": "full" if FULL else "ci", "areas": {
        area: {"tried": r["tried"], "outcomes": dict(r["outcomes"]), "lost": r["lost"], "notes": r["notes"]}
        for area, r in sorted(_rows.items())}}, indent=2) + "\n")
