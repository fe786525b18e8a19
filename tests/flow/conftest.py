"""Real services for flow tests, one of each per session: SeaweedFS (S3), a three-node Ray cluster on
this machine (head + two worker nodes with custom resources), and a temporary Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.run import upload_dir
from requant import seaweed
from requant.convert import convert_local
from requant.seaweed import _free_port
from requant.synth import PROFILES, synthesize

RAY = str(Path(sys.executable).with_name("ray"))


from flow_support import RESTARTED


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = seaweed.start(tmp_path_factory.mktemp("seaweed"))
    with seaweed.exported_env(server):
        yield server
        for running in [server, *RESTARTED]:
            seaweed.stop(running)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    port = _free_port(set())
    # loopback-only test cluster; token auth is for clusters reachable from other hosts
    os.environ["RAY_AUTH_MODE"] = "disabled"
    common = ["--disable-usage-stats", "--num-cpus=1", "--node-ip-address=127.0.0.1"]
    subprocess.run([RAY, "stop", "--force"], capture_output=True)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], check=True,
                   capture_output=True)
    address = f"127.0.0.1:{port}"
    for name in ("worker_a", "worker_b"):
        subprocess.run([RAY, "start", f"--address={address}", f'--resources={{"{name}": 1}}', *common], check=True,
                       capture_output=True)
    os.environ["RAY_ADDRESS"] = address
    yield address
    os.environ.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "stop", "--force"], capture_output=True)


@pytest.fixture(scope="session")
def prefect_api(ray_cluster):
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_tiny(s3_server, tiny_upstream) -> str:
    uri = "s3://upstream/tiny"
    upload_dir(tiny_upstream, uri)
    return uri


@pytest.fixture(scope="session")
def medium_upstream(tmp_path_factory) -> Path:
    """k26-topology cut to 6 layers: 5 MoE layers of 384 experts, enough work per job to interrupt."""
    import dataclasses

    profile = dataclasses.replace(PROFILES["k26-topology"], layers=6, shards=6)
    return synthesize(tmp_path_factory.mktemp("medium") / "k26-6", profile, seed=1, progress=False)


@pytest.fixture(scope="session")
def medium_reference(medium_upstream, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("medium-ref") / "mx"
    convert_local(str(medium_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
    return out


@pytest.fixture(scope="session")
def s3_medium(s3_server, medium_upstream) -> str:
    uri = "s3://upstream/k26-6"
    upload_dir(medium_upstream, uri)
    return uri


@pytest.fixture
def clean_prefix():
    """A fresh output prefix per test."""
    import uuid

    return f"s3://outputs/{uuid.uuid4().hex[:8]}"

