"""make test's pytest run: two lanes at once, since the suite waits (on servers, subprocesses, engines) more than it
computes. A lane is its own pytest process over tests that share nothing with the other lane's: the services lane
holds every test that starts S3, Ray or Prefect (they share session-scoped servers, so they stay together), the
compute lane the rest (Quark, the engines, the trained model, the formats). Each lane writes its own log and JUnit
file under LOG_DIR; a lane's log is printed when it ends, then one closing line for both.

    python -m dev.test_lanes [--serial] [--log-dir DIR] [-- PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# Every test that starts SeaweedFS, Ray or Prefect (grep: s3_server, prefect_api, ray): they share session servers.
# The release's tests (their own local Hub, engines) and the reference server's tests (their own session servers,
# tests/serving/conftest.py) share nothing with either lane and go here for balance. The source formats' oracles
# (tests/test_sources.py, 4.7 min) moved to the compute lane once the vLLM probes ran in one process (clean-clone
# run of a833e26: services 37.9 min, compute 39.7 min, of which the vLLM lane 13.8 min; 2.5 min since).
# Three lanes (the trained model's tests in their own) were measured slower on two cores, in a clean-clone run of
# 58f7e22: the lanes starve each other (load average 11), compute 32.0 min, trained 29.4, services past 40.
SERVICES = ("tests/flow", "tests/ops", "tests/hardening", "tests/test_plan_transport.py", "tests/release",
            "tests/test_hub_write.py", "tests/test_cli_evaluate.py", "tests/serving")


def lanes() -> dict[str, list[str]]:
    tests = Path("tests")
    rest = sorted(str(p) for p in tests.iterdir()
                  if (p.is_dir() and p.name not in {"__pycache__", "data"} or p.name.startswith("test_"))
                  and str(p) not in SERVICES)
    return {"services": list(SERVICES), "compute": rest}


def counts(junit: Path) -> dict[str, int]:
    """passed/failed/skipped from a lane's JUnit file; a lane that wrote none counts as one failure."""
    try:
        suites = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return {"passed": 0, "failed": 1, "skipped": 0}
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites.iter("testsuite"):
        for key in total:
            total[key] += int(suite.get(key, 0))
    failed = total["failures"] + total["errors"]
    return {"passed": total["tests"] - failed - total["skipped"], "failed": failed, "skipped": total["skipped"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serial", action="store_true", help="one lane after the other (for a machine with one core)")
    p.add_argument("--log-dir", type=Path, default=None, help="lane logs and JUnit files (default: a new temp dir)")
    p.add_argument("pytest_args", nargs="*", help="passed to each lane's pytest (after --)")
    args = p.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="requant-test-lanes-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    started, running, results = time.monotonic(), {}, {}
    for name, paths in lanes().items():
        junit, log = log_dir / f"{name}.xml", log_dir / f"{name}.log"
        command = [sys.executable, "-m", "pytest", "-q", f"--junitxml={junit}", *args.pytest_args, *paths]
        print(f"lane {name}: {len(paths)} paths, log {log}", flush=True)
        running[name] = (subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT), junit, log)
        if args.serial:
            running[name][0].wait()
    for name, (proc, junit, log) in running.items():
        code = proc.wait()
        print(f"\n===== lane {name} (exit {code}) =====\n{log.read_text()}", flush=True)
        results[name] = (code, counts(junit))
    total = {k: sum(c[k] for _, c in results.values()) for k in ("passed", "failed", "skipped")}
    exit_code = 0 if all(code == 0 for code, _ in results.values()) else 1
    if exit_code and total["failed"] == 0:  # a lane failed without a failing test (collection, crash): say so
        total["failed"] = 1
    minutes = (time.monotonic() - started) / 60
    print(f"lanes: {', '.join(f'{n} exit {c}' for n, (c, _) in results.items())}; {minutes:.1f} min")
    print(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
