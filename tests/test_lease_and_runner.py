"""The output lease on a local directory (its S3 twin runs in tests/hardening/test_os_failures.py), and the
flow's Ray settings: read from the environment when a flow run starts, secrets never forwarded to Ray."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from requant.io.storage import LocalDir
from requant.lease import Holder, Lease, LeaseHeld, LeaseLost, current_generation


def _lease(root, key="run-a", ttl=120.0):
    return Lease(LocalDir(root), "lease", key, "out", ttl=ttl)


def test_second_lease_refused_then_free_after_release(tmp_path):
    with _lease(tmp_path) as first:
        assert first.generation == 1 and current_generation(LocalDir(tmp_path), "lease") == 1
        with pytest.raises(LeaseHeld, match=r"another run is writing this output \(run run-a on host .*pid \d+"):
            _lease(tmp_path, "run-b").acquire()
    assert current_generation(LocalDir(tmp_path), "lease") is None
    with _lease(tmp_path, "run-b") as second:
        assert second.generation == 1 and second.took_over is None


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A killed holder (PID gone) is stale without waiting for its heartbeat to expire."""
    code = ("import sys, os; from requant.io.storage import LocalDir; from requant.lease import Lease\n"
            "Lease(LocalDir(sys.argv[1]), 'lease', 'run-killed', 'out').acquire(); os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)   # exits holding the lease
    with _lease(tmp_path, "run-next") as lease:
        assert lease.took_over.run_key == "run-killed" and lease.generation == 2
        assert LocalDir(tmp_path).list_files("lease") == ["lease/000000000002.json"]


def test_other_host_is_stale_only_after_its_heartbeat_expires(tmp_path):
    store = LocalDir(tmp_path)
    holder = Holder(1, "run-far", "other-host", "other-boot", 4242, 1.0, time.time(), time.time(), 30.0)
    store.put_bytes("lease/000000000001.json", json.dumps(dataclasses.asdict(holder)).encode())
    with pytest.raises(LeaseHeld, match="run-far on host other-host, pid 4242"):
        _lease(tmp_path).acquire()
    expired = dataclasses.replace(holder, heartbeat=time.time() - 31)
    store.put_bytes("lease/000000000001.json", json.dumps(dataclasses.asdict(expired)).encode())
    with _lease(tmp_path) as lease:
        assert lease.took_over.host == "other-host" and lease.generation == 2


def test_heartbeat_keeps_a_long_run_alive_and_notices_a_takeover(tmp_path):
    lease = _lease(tmp_path, ttl=0.4).acquire()
    first = json.loads(LocalDir(tmp_path).read_bytes("lease/000000000001.json"))["heartbeat"]
    time.sleep(0.5)
    assert json.loads(LocalDir(tmp_path).read_bytes("lease/000000000001.json"))["heartbeat"] > first
    lease.check()                                             # still ours
    LocalDir(tmp_path).put_bytes("lease/000000000002.json", b"{}", if_none_match=True)
    with pytest.raises(LeaseLost, match="another run took over the output"):
        time.sleep(0.3)
        lease.check()
    lease.release()
    assert LocalDir(tmp_path).exists("lease/000000000002.json")  # the new holder's record is left alone


def test_ray_settings_come_from_the_environment_of_the_run(monkeypatch):
    """Import first, then set RAY_ADDRESS: the runner entering a flow run uses the new value; secret-named
    variables never reach Ray's runtime environment (visible in Ray's job metadata and dashboard)."""
    from flows.requantize import EnvRayTaskRunner, ray_settings, requantize

    assert isinstance(requantize.task_runner, EnvRayTaskRunner)
    for name, value in {"RAY_ADDRESS": "10.0.0.9:6379", "AWS_ENDPOINT_URL": "http://s3.local:9000",
                        "AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "s3-secret", "AWS_ACCESS_KEY_ID": "id",
                        "AWS_SESSION_TOKEN": "tok", "REQUANT_API_KEY": "sk-1", "REQUANT_S3_RETRY_SECONDS": "30",
                        "REQUANT_DB_PASSWORD": "pw", "REQUANT_HF_TOKEN": "hf", "REQUANT_CREDENTIALS_FILE": "/x"}.items():
        monkeypatch.setenv(name, value)
    address, kwargs = ray_settings()
    assert address == "10.0.0.9:6379" and "address" not in kwargs
    assert kwargs["runtime_env"]["env_vars"] == {"AWS_ENDPOINT_URL": "http://s3.local:9000", "AWS_REGION": "eu-west-1",
                                                 "REQUANT_S3_RETRY_SECONDS": "30"}
    runner = requantize.task_runner.duplicate()
    assert isinstance(runner, EnvRayTaskRunner) and runner is not requantize.task_runner
    monkeypatch.delenv("RAY_ADDRESS")
    address, kwargs = ray_settings()
    assert address is None and kwargs["address"] == "local"     # a fresh local Ray, never a stray cluster
