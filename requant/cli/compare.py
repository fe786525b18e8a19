"""``requant compare``: two ``requant eval`` outputs against the gate; exit 0 pass, 1 fail, 3 inconclusive."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("compare", help="compare two `requant eval` outputs; report + plot; exit 1 if the gate "
                                            "fails, 3 if inconclusive")
    p.add_argument("candidate", help="candidate's eval directory (holds gsm8k.json)")
    p.add_argument("reference", help="reference's eval directory")
    p.add_argument("--gate", help="gate YAML (default: requant/evaluation/gate.yaml)")
    p.add_argument("--smoke", help="a `requant smoke --out` JSON to include")
    p.add_argument("--out", default="gsm8k-report", help="directory for report.json, report.md, gsm8k.png")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.evaluation.downstream import write_report
    from requant.evaluation.gsm8k import load_result

    smoke = json.loads(Path(args.smoke).read_text()) if args.smoke else None
    comparison, _ = write_report(load_result(args.candidate), load_result(args.reference), smoke, Path(args.out),
                                 args.gate)
    print((Path(args.out) / "report.md").read_text())
    return {"PASS": 0, "FAIL": 1}.get(comparison.verdict, 3)  # 3: INCONCLUSIVE
