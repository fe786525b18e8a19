"""Random faults over repeated requantize runs of `tiny`: a killed Ray worker, a killed flow process, or an
S3 server restart, at a random moment. Every run must end complete and byte-identical to the reference, or
incomplete (no manifest) and then resume to byte-identical. Outcomes go into the hardening report."""

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
from flow_support import RESTARTED
from test_requantize_flow import _flow_subprocess, _run, _same_checkpoint

from requant.assemble import MANIFEST_FILE
from requant.io.s3 import S3Storage
from requant.seaweed import start, stop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hardening"))
from hardening_support import Ledger, scale

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory, tiny_upstream):
    from requant.convert import convert_local

    out = tmp_path_factory.mktemp("faultref") / "mx"
    convert_local(str(tiny_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
    return out


def _ray_workers() -> list[int]:
    """Busy layer-job workers first; else any Ray worker process (idle ones are reused by the next job)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    busy = [int(x.split()[0]) for x in lines if "ray::convert-layer" in x or "ray::hash-input" in x]
    return busy or [int(x.split()[0]) for x in lines if "ray::IDLE" in x or "default_worker.py" in x]


def test_random_faults_never_corrupt(prefect_api, s3_server, s3_tiny, tiny_reference):
    ledger = Ledger()
    rng = random.Random(int(os.environ.get("REQUANT_FAULT_SEED", "7")))
    for trial in range(scale(3, 12)):
        fault = rng.choice(["ray-worker", "flow", "s3"])
        output = f"s3://outputs/fault-{uuid.uuid4().hex[:8]}"
        proc = _flow_subprocess(prefect_api, s3_tiny, output)
        time.sleep(rng.uniform(2.0, 12.0))
        injected = "after exit" if proc.poll() is not None else fault
        if proc.poll() is None:
            if fault == "ray-worker":
                victims = _ray_workers()
                injected = "ray-worker" if victims else "ray-worker (none running)"
                for pid in victims[:1]:
                    os.kill(pid, signal.SIGKILL)
            elif fault == "flow":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                server = RESTARTED[-1] if RESTARTED else s3_server
                stop(server, grace=1.0)
                time.sleep(2)
                RESTARTED.append(start(server.data_dir, ports=server.ports))
        try:
            proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        published = S3Storage(output).exists(MANIFEST_FILE)
        if proc.returncode == 0:
            assert published, "run reported success without a manifest"
            _same_checkpoint(output, tiny_reference)
            outcome = "complete, byte-identical"
        else:
            assert not published, "a failed run left a manifest: it looks complete"
            _run(upstream=s3_tiny, output=output, recipe="kimi-k2.6-mxfp4")
            _same_checkpoint(output, tiny_reference)
            outcome = "incomplete, resumed to byte-identical"
        ledger.record("faults during runs", f"{injected}: {outcome}")
