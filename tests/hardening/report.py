"""Print hardening.json (written by the tests/hardening suite into the run's artifacts folder, which
TEST_ARTIFACTS_DIR names; `make hardening` sets it for both steps) as a table."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    folder = os.environ.get("TEST_ARTIFACTS_DIR")
    if not folder:
        print("TEST_ARTIFACTS_DIR is not set: name the test run's artifacts folder (make hardening does)",
              file=sys.stderr)
        return 2
    REPORT = Path(folder) / "hardening.json"  # noqa: N806
    if not REPORT.exists():
        print(f"no {REPORT}; run the hardening suite first (make hardening)", file=sys.stderr)
        return 2
    data = json.loads(REPORT.read_text())
    rows = [("area", "tried", "outcomes", "lost")]
    for area, r in data["areas"].items():
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))
        rows.append((area, str(r["tried"]), outcomes, str(r["lost"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"hardening report ({data['scale']} scale)")
    for k, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for area, r in data["areas"].items():
        for note in r["notes"]:
            print(f"- {area}: {note}")
    lost = sum(r["lost"] for r in data["areas"].values())
    print(f"nothing lost: {'yes' if lost == 0 else f'NO ({lost})'}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
