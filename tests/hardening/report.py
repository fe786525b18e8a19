"""Print hardening.json (written by the tests/hardening suite into the run's artifacts folder, which
TEST_ARTIFACTS_DIR names; `make hardening` sets it for both steps) as a table. With ``--out DIR`` (make hardening:
results/) also write it there as hardening.json with the date, versions and machine, and hardening.md, for the docs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The code these figures measure: the whole package under its fault suites (make hardening runs them).
MEASURES = ("requant", "flows", "tasks", "tests/hardening", "tests/flow/test_fault_loop.py",
            "tests/flow/test_integrity_flow.py", "tests/flow/test_evaluate_flow.py")


def table(data: dict) -> str:
    rows = [("area", "tried", "outcomes", "lost")]
    for area, r in data["areas"].items():
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(r["outcomes"].items()))
        rows.append((area, str(r["tried"]), outcomes, str(r["lost"])))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|---|---:|---|---:|")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write hardening.json (with provenance) and hardening.md here")
    args = parser.parse_args()
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
    if args.out:
        from requant.bench.provenance import run_info

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hardening.json").write_text(json.dumps({"run": run_info(measures=MEASURES), **data}, indent=1) + "\n")
        (out / "hardening.md").write_text(table(data))
    print(f"nothing lost: {'yes' if lost == 0 else f'NO ({lost})'}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
