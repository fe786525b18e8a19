"""Random faults over repeated requantize runs of `tiny`: a killed Ray worker, a killed flow process, or an
S3 server restart, at a random moment while the run is in progress. A killed Ray worker (Ray retries its task)
and a 2 s S3 restart (inside the S3 retry budget) must end complete and byte-identical to the reference; a
killed flow process ends incomplete (no manifest, exit -SIGKILL) and the same run resumes to byte-identical. A trial
counts only if its fault was injected mid-run (flow still running, nothing published yet, and for a worker
kill a layer job actually running); others are retried. Outcomes go into the hardening report."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_requantize_flow import _flow_subprocess, _run, _same_checkpoint

from requant.io.s3 import S3Storage
from requant.manifest import MANIFEST_FILE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hardening"))
from hardening_support import Ledger, scale

pytestmark = pytest.mark.services

BUSY = ("ray::convert-layer", "ray::hash-input")


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory, tiny_upstream):
    import requant

    out = tmp_path_factory.mktemp("faultref") / "mx"
    requant.convert(str(tiny_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
    return out


def _in_progress(proc, output: str) -> bool:
    return proc.poll() is None and not S3Storage(output).exists(MANIFEST_FILE)


def _inject(fault: str, proc, output: str, rng, s3_server, ray_cluster) -> bool:
    """Inject ``fault`` at a random moment of the run; True only if it hit the run while in progress."""
    deadline = time.monotonic() + rng.uniform(1.0, 8.0)
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if fault == "ray-worker":
        while _in_progress(proc, output):  # from the random moment on, the next running layer job
            victims = ray_cluster.workers(*BUSY)
            if victims:
                os.kill(victims[0], signal.SIGKILL)
                return True
            time.sleep(0.05)
        return False
    if not _in_progress(proc, output):
        return False
    if fault == "flow":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        s3_server.restart(pause=2.0)
    return True


def test_random_faults_never_corrupt(prefect_api, s3_server, ray_cluster, s3_tiny, tiny_reference):
    ledger = Ledger()
    S3Storage("s3://outputs").ensure_bucket()  # polled below before the first run creates it
    rng = random.Random(int(os.environ.get("REQUANT_FAULT_SEED", "7")))
    wanted, counted, attempts = scale(3, 12), 0, 0
    while counted < wanted:
        attempts += 1
        assert attempts <= 4 * wanted, f"only {counted} of {attempts} trials got their fault in mid-run"
        fault = rng.choice(["ray-worker", "flow", "s3"])
        output = f"s3://outputs/fault-{uuid.uuid4().hex[:8]}"
        proc = _flow_subprocess(prefect_api, s3_tiny, output)
        injected = _inject(fault, proc, output, rng, s3_server, ray_cluster)
        try:
            log, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        published = S3Storage(output).exists(MANIFEST_FILE)
        if proc.returncode == 0:
            assert published, "run reported success without a manifest"
            _same_checkpoint(output, tiny_reference)
            outcome = "complete, byte-identical"
        else:
            # Ray retries a killed worker's task, and a 2 s S3 outage is inside requant's S3 retry budget: both must
            # complete. Only a killed flow process may leave the run incomplete, and then by the injected signal.
            assert injected and fault == "flow", f"a {fault} fault failed the run (exit {proc.returncode}):\n{log[-3000:]}"
            assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not the injected kill:\n{log[-3000:]}"
            assert not published, "a failed run left a manifest: it looks complete"
            _run(upstream=s3_tiny, output=output, recipe="kimi-k2.6-mxfp4")
            _same_checkpoint(output, tiny_reference)
            outcome = "incomplete, resumed to byte-identical"
        if injected:
            counted += 1
            ledger.record("faults during runs (injected mid-run)", f"{fault}: {outcome}")
    ledger.note("faults during runs (injected mid-run)",
                f"{attempts - counted} of {attempts} trials missed the run (it had finished) and were not counted")
