"""Real services for flow tests, one of each per session: SeaweedFS (S3), a three-node Ray cluster on
this machine (head + two worker nodes with custom resources), and a temporary Prefect server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from flow_support import RayCluster, S3Service

import requant
from requant.io.transfer import upload_dir
from requant.testing import seaweed
from requant.testing.seaweed import _free_port
from requant.testing.synth import PROFILES, synthesize

# The session's S3 identity. Its secret is scanned for in every object, artifact and log of an evaluated run
# (tests/flow/test_evaluate_flow.py), so it must be the secret actually in use, not a decoy.
S3_ACCESS_KEY = "requant-tests"
S3_SECRET = f"s3-SECRET-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    service = S3Service(seaweed.start(tmp_path_factory.mktemp("seaweed"), access_key=S3_ACCESS_KEY,
                                      secret_key=S3_SECRET))
    with seaweed.exported_env(service.current):
        yield service
    service.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server, local_hub, tmp_path_factory):
    """Head + two worker nodes with custom resources, all children of this process; stopped by their own
    process trees (never `ray stop`, which would stop any other Ray on the host)."""
    # loopback-only test cluster; token auth is for clusters reachable from other hosts
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        cluster = RayCluster(_free_port(set()), dict(os.environ), tmp_path_factory.mktemp("ray-logs"))
        try:
            cluster.start({"worker_a": {"worker_a": 1}, "worker_b": {"worker_b": 1}})
            mp.setenv("RAY_ADDRESS", cluster.address)
            yield cluster
        finally:
            cluster.stop()


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
def s3_trained(s3_server, trained_upstream) -> str:
    uri = "s3://upstream/trained"
    upload_dir(trained_upstream, uri)
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
    requant.convert(str(medium_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
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

