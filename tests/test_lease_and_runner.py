"""The output lease on a local directory (its S3 twin runs in tests/hardening/test_os_failures.py), and the
flow's Ray settings: read from the environment when a flow run starts, secrets never forwarded to Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
from waiting import wait_for

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
    """The heartbeat renews the record again and again (polled: a loaded machine may delay a beat, never skip the
    check); a newer generation written by another run is noticed by the beat itself and by check()."""
    lease = _lease(tmp_path, ttl=0.4).acquire()

    def beat() -> float:
        return json.loads(LocalDir(tmp_path).read_bytes("lease/000000000001.json"))["heartbeat"]

    first = beat()
    second = wait_for(lambda: beat() > first and beat(), 30, "a heartbeat", interval=0.05)
    wait_for(lambda: beat() > second, 30, "another heartbeat", interval=0.05)
    lease.check()                                             # still ours
    LocalDir(tmp_path).put_bytes("lease/000000000002.json", b"{}", if_none_match=True)
    wait_for(lambda: lease._lost, 30, "the heartbeat to notice the takeover", interval=0.05)
    with pytest.raises(LeaseLost, match="another run took over the output"):
        lease.check()
    lease.release()
    assert LocalDir(tmp_path).exists("lease/000000000002.json")  # the new holder's record is left alone


def test_ray_settings_come_from_the_environment_of_the_run(monkeypatch):
    """Import first, then set RAY_ADDRESS: the runner entering a flow run uses the new value; secret-named
    variables never reach Ray's runtime environment (visible in Ray's job metadata and dashboard)."""
    from requant.flows.requantize import requantize
    from requant.flows.runtime import EnvRayTaskRunner, ray_settings

    assert isinstance(requantize.task_runner, EnvRayTaskRunner)
    for name in [n for n in os.environ if n.startswith("HF_")]:
        monkeypatch.delenv(name)  # the session's local Hub sets some
    for name, value in {"RAY_ADDRESS": "10.0.0.9:6379", "AWS_ENDPOINT_URL": "http://s3.local:9000",
                        "AWS_REGION": "eu-west-1", "AWS_SECRET_ACCESS_KEY": "s3-secret", "AWS_ACCESS_KEY_ID": "id",
                        "AWS_SESSION_TOKEN": "tok", "REQUANT_API_KEY": "sk-1", "REQUANT_S3_RETRY_SECONDS": "30",
                        "REQUANT_DB_PASSWORD": "pw", "REQUANT_HF_TOKEN": "hf", "REQUANT_CREDENTIALS_FILE": "/x",
                        "HF_ENDPOINT": "http://hub.local", "HF_TOKEN": "hf_secret", "HF_HUB_DISABLE_XET": "1",
                        "HF_HUB_TOKEN_PATH": "/x"}.items():
        monkeypatch.setenv(name, value)
    address, kwargs = ray_settings()
    assert address == "10.0.0.9:6379" and "address" not in kwargs
    assert kwargs["runtime_env"]["env_vars"] == {"AWS_ENDPOINT_URL": "http://s3.local:9000", "AWS_REGION": "eu-west-1",
                                                 "REQUANT_S3_RETRY_SECONDS": "30", "HF_ENDPOINT": "http://hub.local",
                                                 "HF_HUB_DISABLE_XET": "1"}
    runner = requantize.task_runner.duplicate()
    assert isinstance(runner, EnvRayTaskRunner) and runner is not requantize.task_runner
    monkeypatch.delenv("RAY_ADDRESS")
    address, kwargs = ray_settings()
    assert address is None and kwargs["address"] == "local"     # a fresh local Ray, never a stray cluster


def test_a_cuda_layer_job_reserves_a_gpu_unless_told_otherwise():
    """Ray hides GPUs from a task that reserves none, so device=cuda without num_gpus would find no GPU."""
    from requant.flows.parameters import Cluster
    from requant.flows.requantize import ray_options

    assert ray_options(Cluster(device="cuda", num_cpus=8))["num_gpus"] == 1
    assert ray_options(Cluster(device="cuda:1", num_cpus=8))["num_gpus"] == 1
    options = ray_options(Cluster(device="cuda", num_cpus=8, num_gpus=0.5, resources={"mi350x": 1}))
    assert (options["num_cpus"], options["num_gpus"], options["resources"]) == (8, 0.5, {"mi350x": 1})
    assert ray_options(Cluster())["num_gpus"] == 0


PROBE_FLOW = """
import json, os
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect_ray.context import remote_options
from requant.flows.runtime import EnvRayTaskRunner, start_ephemeral_server, worker_slots
from requant.tasks.convert import task_threads

@task
def probe():
    return {"api": os.environ.get("PREFECT_API_URL"), "threads": task_threads(0), "pinned": task_threads(3)}

@flow(task_runner=EnvRayTaskRunner())
def run():
    with remote_options(num_cpus=1):
        seen = probe.submit().result()
    seen["slots"] = [worker_slots(reserved) for reserved in ({"num_cpus": 1}, {"num_cpus": 0.5, "num_gpus": 0},
                     {"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 1, "resources": {"mi350x": 1}})]
    with get_client(sync_client=True) as client:
        return seen, str(client.api_url)

started = start_ephemeral_server()
print("RESULT " + json.dumps([*run(), started]))
"""


@pytest.mark.services
def test_local_ray_workers_use_the_flows_ephemeral_prefect_server_and_their_cpus(tmp_path):
    """No PREFECT_API_URL (``make flow-run``): the flow runs on Prefect's ephemeral server, and local Ray workers
    report to that one instead of each starting their own. A layer job's default thread count is the CPUs Ray
    reserved for its task (1 here: neither the local cluster's 3 CPUs nor the machine's cores); the cluster holds as
    many layer jobs at once as its nodes have of what each job reserves. The entry points
    start that server first, allowing it the time a fresh PREFECT_HOME needs on a loaded machine (over Prefect's
    20 s once in CI)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), REQUANT_RAY_CPUS="3", RAY_AUTH_MODE="disabled",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")  # a fresh home takes longer: ours must wait
    proc = subprocess.run([sys.executable, "-c", PROBE_FLOW], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen, driver_api, started = json.loads(next(li for li in proc.stdout.splitlines() if li.startswith("RESULT "))[7:])
    assert driver_api.startswith("http://127.0.0.1:") and driver_api.rstrip("/").endswith("/api")
    assert seen["api"].rstrip("/") == driver_api.rstrip("/") == started.rstrip("/")  # the server started first
    assert seen["threads"] == 1 and seen["pinned"] == 3
    assert seen["slots"] == [3, 6, 0, 0]  # layer jobs the cluster holds at once (no GPU, no mi350x node here)


def test_sealed_job_is_not_walked_by_prefect_and_pickles_whole():
    """Layer jobs go to their Ray task inside ``Sealed``: Prefect's search for futures in a task's parameters
    does not descend into it (it did into every tensor task of every job), and it pickles with its contents."""
    import pickle

    from prefect.utilities.collections import visit_collection

    from requant.tasks.convert import Sealed, _plain

    job = {"tasks": [["a", "b"], ["c"]]}
    visited: list = []
    out = visit_collection({"job": Sealed(job), "name": "layer-1"}, visit_fn=lambda x: visited.append(x) or x,
                           return_data=True)
    assert not any(v in (["a", "b"], "a", "c") for v in visited)
    assert _plain(out["job"]) is job
    assert _plain(pickle.loads(pickle.dumps(out["job"]))) == job
    assert _plain(pickle.loads(pickle.dumps(Sealed(None)))) is None


def test_hash_tasks_carry_at_least_a_gib_each_in_order():
    from requant.tasks.convert import hash_groups

    gib = 1 << 30
    assert hash_groups([("a", 9 * gib), ("b", 9 * gib)]) == [["a"], ["b"]]          # K2.6 shards: one task each
    assert hash_groups([(f"s{i}", 2_500_000) for i in range(62)]) == [[f"s{i}" for i in range(62)]]
    assert hash_groups([("a", gib // 2), ("b", gib // 2), ("c", 1)]) == [["a", "b"], ["c"]]
    assert hash_groups([]) == []
