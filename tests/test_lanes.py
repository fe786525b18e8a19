"""make test's two pytest lanes (dev/test_lanes.py): they cover the suite once, and every test that starts S3, Ray
or Prefect is in the services lane, so no server is started twice at once or shared across processes."""

from __future__ import annotations

import re
from pathlib import Path

from dev.test_lanes import SERVICES, counts, lanes

TESTS = Path(__file__).resolve().parent
SERVICE_USE = re.compile(r"\b(s3_server|prefect_api|prefect_test_harness|import ray|ray\.init|seaweed\.(start|restart))\b")


def _lane_of(path: Path, split: dict[str, list[str]]) -> list[str]:
    rel = path.relative_to(TESTS.parent)
    return [name for name, paths in split.items() if any(rel == Path(p) or Path(p) in rel.parents for p in paths)]


def test_every_test_module_is_in_exactly_one_lane_and_services_stay_together(monkeypatch):
    monkeypatch.chdir(TESTS.parent)
    split = lanes()
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 50
    for module in modules:
        found = _lane_of(module, split)
        assert len(found) == 1, (module, found)
        if module != Path(__file__).resolve() and SERVICE_USE.search(module.read_text()):
            assert found == ["services"], f"{module} starts a service but runs in the {found} lane; add it to SERVICES"
    assert all((TESTS.parent / p).exists() for p in SERVICES)


def test_counts_come_from_the_junit_file_and_a_missing_one_is_a_failure(tmp_path):
    junit = tmp_path / "lane.xml"
    junit.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    assert counts(junit) == {"passed": 3, "failed": 2, "skipped": 2}
    assert counts(tmp_path / "absent.xml") == {"passed": 0, "failed": 1, "skipped": 0}
