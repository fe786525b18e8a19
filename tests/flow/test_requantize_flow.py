"""The requantize flow on real services: SeaweedFS, a 3-node Ray cluster, a Prefect server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from waiting import wait_for

from requant.errors import PlanError
from requant.io.s3 import S3Storage
from requant.io.transfer import upload_dir

pytestmark = pytest.mark.services

COMPARED = ("config.json", "model.safetensors.index.json")


def _run(**kwargs):
    from requant.flows.requantize import requantize

    state = requantize(progress=False, evaluation={"enabled": False}, return_state=True, **kwargs)
    return state.result(), state.state_details.flow_run_id  # a RequantizeResult


def _same_checkpoint(s3_uri: str, local_dir) -> None:
    """Every shard, the index and the config byte-identical to ``requant convert --local``."""
    storage = S3Storage(s3_uri)
    ours = json.loads(storage.read_bytes("requant-manifest.json"))
    ref = json.loads((local_dir / "requant-manifest.json").read_text())
    compared = [f for f in ref["outputs"] if f.endswith(".safetensors")] + list(COMPARED)
    assert set(f for f in ours["outputs"] if f.endswith(".safetensors")) == set(f for f in ref["outputs"] if f.endswith(".safetensors"))
    for name in compared:
        assert ours["outputs"][name] == ref["outputs"][name], name
        assert storage.sha256(name) == ref["outputs"][name]["sha256"], name
    assert ours["tensors"] == ref["tensors"] and ours["sources"] == ref["sources"]


def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


@pytest.fixture(scope="module")
def tiny_local_reference(tmp_path_factory, tiny_upstream):
    import requant

    out = tmp_path_factory.mktemp("tinyref") / "mx"
    requant.convert(str(tiny_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
    return out


def test_flow_from_the_hub_equals_local_convert(prefect_api, local_hub, tiny_local_reference, clean_prefix):
    """``hf://testorg/gated@main`` (gated: HF_TOKEN on the nodes) through the flow on Ray: the pinned commit in the
    manifest, every shard checked against the Hub's sha256, layer jobs reading byte ranges on the workers, and the
    token nowhere in what the run leaves: objects, artifacts, logs, the flow run's parameters, Ray's runtime env."""
    from prefect.client.orchestration import get_client

    from requant.flows.runtime import ray_settings

    seen = len(local_hub.server.requests)
    summary, run_id = _run(upstream="hf://testorg/gated@main", output=clean_prefix, recipe="kimi-k2.6-mxfp4")
    assert summary.conversion.jobs == 4 and summary.conversion.resumed == 0
    _same_checkpoint(clean_prefix, tiny_local_reference)
    manifest = json.loads(S3Storage(clean_prefix).read_bytes("requant-manifest.json"))
    commit = local_hub.commits["gated"]
    assert (manifest["upstream"]["uri"], manifest["upstream"]["revision"]) == (f"hf://testorg/gated@{commit}", commit)
    assert all(d["verified_against_published"] for d in manifest["inputs"]["shards"].values())
    storage_reads = [r for r in local_hub.server.requests[seen:] if r.path.startswith("/lfs-storage/")]
    assert sum(1 for r in storage_reads if r.range is None) == len(manifest["inputs"]["shards"])  # the hash tasks
    assert sum(1 for r in storage_reads if r.status == 206) >= 8  # headers and tensor spans, read by the jobs

    token = local_hub.token.encode()
    storage = S3Storage(clean_prefix)
    assert not [name for name in storage.list_files() if token in storage.read_bytes(name)]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        logs = client.read_logs()
        artifacts = client.read_artifacts()
    assert local_hub.token not in json.dumps(run.parameters) and logs and artifacts
    assert not [log for log in logs if local_hub.token in log.message]
    assert not [a.key for a in artifacts if local_hub.token in str(a.data)]
    assert local_hub.token not in json.dumps(ray_settings()[1])
    arts = _artifacts(run_id)
    assert arts["requantize-progress"].data == 100.0
    rows = json.loads(arts["requantize-jobs"].data)
    assert sorted(r["job"] for r in rows) == ["layer-000", "layer-001", "layer-002", "non-layer"]
    assert all({"tensors", "bytes_in", "bytes_out", "min_snr_db", "seconds", "node"} <= set(r) for r in rows)
    assert clean_prefix in arts["requantize-summary"].data


def test_jobs_run_on_more_than_one_ray_node(prefect_api, s3_medium, clean_prefix):
    summary, run_id = _run(upstream=s3_medium, output=clean_prefix, recipe="amd-kimi-mxfp4")
    rows = json.loads(_artifacts(run_id)["requantize-jobs"].data)
    assert len({r["node"] for r in rows}) > 1, rows
    assert len(summary.conversion.nodes) > 1


def _flow_subprocess(prefect_api, upstream, output, recipe="kimi-k2.6-mxfp4", env=None, cluster=None):
    code = ("import json, sys; from requant.flows.requantize import requantize; "
            "requantize(upstream=sys.argv[1], output=sys.argv[2], recipe=sys.argv[3], progress=False, "
            "evaluation={'enabled': False}, cluster=json.loads(sys.argv[4]))")
    env = dict(os.environ, PREFECT_API_URL=prefect_api, **(env or {}))
    return subprocess.Popen([sys.executable, "-c", code, upstream, output, recipe, json.dumps(cluster or {})], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _listing(output: str, under: str) -> list[str]:
    """Objects under ``output/under``; none while the run has not created its bucket yet."""
    from requant.errors import SystemFailure

    try:
        return S3Storage(output).list_files(under)
    except SystemFailure as exc:
        if "does not exist" in str(exc):
            return []
        raise


def _records(output: str) -> list[str]:
    return [f for f in _listing(output, ".requant/runs") if f.endswith(".json")]


def _wait_for(predicate, timeout: float, what: str):
    return wait_for(predicate, timeout, what, interval=0.2)


def test_killed_ray_worker_is_retried(prefect_api, ray_cluster, s3_medium, medium_reference, clean_prefix):
    """SIGKILL of the Ray worker process in the middle of a layer job (found by the pid its attempt recorded):
    Ray starts that job again, the jobs artifact shows it as attempt 2 (every other job as attempt 1), and
    the run completes byte-identical. The job found may finish between the look and the kill, and the worker
    start the next one: the job retried is the one whose first attempt ran in the killed process."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    proc = _flow_subprocess(prefect_api, s3_medium, clean_prefix)
    storage = S3Storage(clean_prefix)

    def running_job():
        busy = set(ray_cluster.workers("ray::convert-layer"))
        names = set(_listing(clean_prefix, ".requant/runs"))
        for name in sorted(names):
            stem = name.removesuffix(".attempts")
            if name.endswith(".attempts") and f"{stem}.json" not in names:
                pid = json.loads(storage.read_bytes(name))[-1]["pid"]
                if pid in busy:
                    return stem.rsplit("/", 1)[-1], pid
        return None

    _, pid = _wait_for(running_job, 300, "a Ray worker in the middle of a layer job")
    os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    _same_checkpoint(clean_prefix, medium_reference)
    with get_client(sync_client=True) as client:
        run = next(r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20)
                   if r.parameters.get("output") == clean_prefix)
    rows = json.loads(_artifacts(run.id)["requantize-jobs"].data)
    retried = [r["job"] for r in rows if r["attempt"] != 1]
    assert len(retried) == 1 and {r["attempt"] for r in rows} == {1, 2}, rows
    attempts = next(n for n in _listing(clean_prefix, ".requant/runs") if n.endswith(f"/{retried[0]}.attempts"))
    assert [a["pid"] for a in json.loads(storage.read_bytes(attempts))][0] == pid, retried


def test_killed_flow_resumes_and_skips_finished_jobs(prefect_api, s3_medium, medium_reference, clean_prefix):
    proc = _flow_subprocess(prefect_api, s3_medium, clean_prefix)
    _wait_for(lambda: len(_records(clean_prefix)) >= 2, 300, "two finished layer jobs")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # let Ray cancel the dead driver's tasks
    finished = len(_records(clean_prefix))
    assert not S3Storage(clean_prefix).exists("requant-manifest.json")  # never looks complete
    summary, _ = _run(upstream=s3_medium, output=clean_prefix, recipe="kimi-k2.6-mxfp4")
    assert summary.conversion.resumed >= finished >= 2
    assert summary.conversion.resumed < summary.conversion.jobs
    _same_checkpoint(clean_prefix, medium_reference)


def _tensor_bytes(directory) -> dict[str, bytes]:
    from safetensors import safe_open

    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({name: f.get_tensor(name).view(-1).view(torch.uint8).numpy().tobytes() for name in f.keys()})
    return out


def test_split_jobs_resume_and_equal_the_local_split(prefect_api, s3_medium, medium_upstream, medium_reference,
                                                     clean_prefix, tmp_path):
    """A cluster holding more jobs at once than the plan has (3 nodes of 1 CPU, 0.25 CPU per job: 12 > 7): the flow
    cuts each MoE layer into expert groups; killed mid-run, a rerun takes over the dead run's lease, skips the split
    jobs it finished and publishes what ``requant convert --local --expert-groups`` writes, byte for byte, every
    tensor as the whole layers write it, and no shard of the earlier whole-layer checkpoint left in the prefix."""
    import requant

    upload_dir(medium_reference, clean_prefix)          # an earlier run's checkpoint, its layers whole
    cluster = {"num_cpus": 0.25}
    proc = _flow_subprocess(prefect_api, s3_medium, clean_prefix, cluster=cluster)
    _wait_for(lambda: len(_records(clean_prefix)) >= 2, 300, "two finished layer jobs")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # let Ray cancel the dead driver's tasks
    finished = len(_records(clean_prefix))
    summary, run_id = _run(upstream=s3_medium, output=clean_prefix, recipe="kimi-k2.6-mxfp4", cluster=cluster)
    assert summary.conversion.jobs == 13 and summary.conversion.resumed >= finished >= 2  # 5 MoE layers, non-layer: 2
    assert summary.conversion.resumed < summary.conversion.jobs
    rows = json.loads(_artifacts(run_id)["requantize-jobs"].data)
    assert sum(r["job"].startswith("layer-001-experts-") for r in rows) == 2

    local = tmp_path / "split"
    requant.convert(str(medium_upstream), str(local), "kimi-k2.6-mxfp4", progress=False, expert_groups=2)
    _same_checkpoint(clean_prefix, local)
    manifest = json.loads(S3Storage(clean_prefix).read_bytes("requant-manifest.json"))
    assert manifest["upstream"]["run_key"] == summary.conversion.run_key
    shards = sorted(f for f in S3Storage(clean_prefix).list_files() if f.endswith(".safetensors"))
    assert shards == sorted(f for f in manifest["outputs"] if f.endswith(".safetensors"))
    assert all(f.endswith("-of-00013.safetensors") for f in shards)
    assert _tensor_bytes(local) == _tensor_bytes(medium_reference)


def test_s3_restart_during_a_run(prefect_api, s3_server, s3_medium, medium_reference, clean_prefix):
    """The server goes away for ~3 s mid-run: requant's retries ride it out, the run completes unchanged."""
    proc = _flow_subprocess(prefect_api, s3_medium, clean_prefix)
    _wait_for(lambda: len(_records(clean_prefix)) >= 1, 300, "a finished layer job")
    assert proc.poll() is None, "the run ended before the outage"
    s3_server.restart(pause=3.0)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    _same_checkpoint(clean_prefix, medium_reference)


def test_s3_outage_longer_than_the_retry_budget_fails_clearly(prefect_api, s3_server, s3_medium, medium_reference,
                                                              clean_prefix):
    """Past REQUANT_S3_RETRY_SECONDS the run fails naming the unreachable object store, publishes nothing,
    and a rerun resumes to a complete checkpoint."""
    proc = _flow_subprocess(prefect_api, s3_medium, clean_prefix, env={"REQUANT_S3_RETRY_SECONDS": "3"})
    _wait_for(lambda: len(_records(clean_prefix)) >= 1, 300, "a finished layer job")
    assert proc.poll() is None, "the run ended before the outage"
    from requant.testing import seaweed

    seaweed.stop(s3_server.current, grace=1.0)
    try:
        output = proc.communicate(timeout=600)[0].decode(errors="replace")
    finally:
        s3_server.restart(pause=0.0)
    assert proc.returncode != 0
    assert "object storage unreachable for 3s" in output, output[-3000:]
    assert not S3Storage(clean_prefix).exists("requant-manifest.json")
    summary, _ = _run(upstream=s3_medium, output=clean_prefix, recipe="kimi-k2.6-mxfp4")
    assert summary.conversion.resumed >= 1
    _same_checkpoint(clean_prefix, medium_reference)


def test_bad_input_fails_at_plan_time(prefect_api, s3_server, tiny_upstream, tmp_path, clean_prefix):
    import shutil

    up = tmp_path / "bad"
    shutil.copytree(tiny_upstream, up)
    last = sorted(up.glob("model-*.safetensors"))[-1]
    last.write_bytes(b"\xff" * 8 + last.read_bytes()[8:])  # header length past the end of the file
    index = json.loads((up / "model.safetensors.index.json").read_text())
    # a second, independent problem: a scale missing from the index, in a shard other than the broken one
    missing = next(n for n, f in sorted(index["weight_map"].items())
                   if n.endswith("down_proj.weight_scale") and ".experts." in n and f != last.name)
    index["weight_map"].pop(missing)
    (up / "model.safetensors.index.json").write_text(json.dumps(index))
    upload_dir(up, "s3://upstream/bad-tiny")
    with pytest.raises(PlanError) as info:
        _run(upstream="s3://upstream/bad-tiny", output=clean_prefix, recipe="kimi-k2.6-mxfp4")
    assert len(info.value.problems) >= 2 and last.name in str(info.value.problems)
    assert _listing(clean_prefix, "") == []  # no job ran, nothing written


def test_verify_reads_s3_and_catches_a_flipped_object(prefect_api, s3_tiny, clean_prefix, capsys):
    from requant.cli import main

    _run(upstream=s3_tiny, output=clean_prefix, recipe="amd-kimi-mxfp4")
    assert main(["verify", clean_prefix]) == 0
    storage = S3Storage(clean_prefix)
    data = bytearray(storage.read_bytes("model-00002-of-00004.safetensors"))
    data[-10] ^= 0xFF
    storage.put_bytes("model-00002-of-00004.safetensors", bytes(data))
    assert main(["verify", clean_prefix]) == 2
    assert "model-00002-of-00004.safetensors" in capsys.readouterr().err


def test_local_directories_as_source_and_destination(prefect_api, tiny_upstream, tiny_local_reference, tmp_path):
    from requant.verification import verify

    out = tmp_path / "flow-out"
    summary, _ = _run(upstream=str(tiny_upstream), output=str(out), recipe="kimi-k2.6-mxfp4")
    assert verify(str(out)).upstream_tensors == 203 and summary.conversion.resumed == 0
    ref = json.loads((tiny_local_reference / "requant-manifest.json").read_text())["outputs"]
    got = json.loads((out / "requant-manifest.json").read_text())["outputs"]
    assert all(got[f] == ref[f] for f in ref if f.endswith(".safetensors") or f in COMPARED)


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_holder(prefect_api, s3_medium, medium_reference,
                                                                         clean_prefix):
    """A scheduled and a manual run on one prefix: the second is refused by the first's lease, which then
    completes; nothing of the second is published."""
    from requant.lease import LeaseHeld

    first = _flow_subprocess(prefect_api, s3_medium, clean_prefix)
    _wait_for(lambda: _listing(clean_prefix, ".requant/lease"), 180, "the first run's lease")
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match=r"another run is writing this output \(run [0-9a-f]{16} on host .*, pid \d+"):
        _run(upstream=s3_medium, output=clean_prefix, recipe="amd-kimi-mxfp4")
    assert time.monotonic() - started < 60                      # at once: planning, then the lease, no jobs
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-3000:]
    _same_checkpoint(clean_prefix, medium_reference)            # the first run's recipe, complete
    assert S3Storage(clean_prefix).list_files(".requant/lease") == []


def test_refused_credentials_fail_the_cli_flow_in_one_line(prefect_api, s3_server, s3_tiny, clean_prefix):
    env = dict(os.environ, PREFECT_API_URL=prefect_api, AWS_SECRET_ACCESS_KEY="not-the-secret")
    proc = subprocess.run([sys.executable, "-m", "requant.flows.cli", "convert", s3_tiny, clean_prefix, "--recipe",
                           "kimi-k2.6-mxfp4"], env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("requant convert: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert s3_tiny in errors[0] and "credentials refused by the object store" in errors[0], errors[0]
    assert "not-the-secret" not in proc.stderr + proc.stdout
    assert _listing(clean_prefix, "") == []


def test_the_cli_flow_refuses_another_runs_checkpoint_without_overwrite(prefect_api, s3_server, s3_tiny, clean_prefix,
                                                                        tiny_local_reference):
    """`requant convert` refuses a destination that holds a converted checkpoint, as --local does, before any job
    runs; --jobs belongs to --local and is refused too. (The flow itself replaces by default: the watcher does.)"""
    storage = S3Storage(clean_prefix)
    storage.ensure_bucket()
    for path in sorted(tiny_local_reference.rglob("*")):
        if path.is_file():
            storage.put_file(str(path.relative_to(tiny_local_reference)), path)
    before = {f: storage.read_bytes(f) for f in ("requant-manifest.json", "config.json")}
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    for extra, message in (([], f"{clean_prefix}: already holds a converted checkpoint of another run (pass "
                                "--overwrite to replace it)"),
                           (["--overwrite", "--jobs", "2"], "--jobs sizes --local's worker processes")):
        proc = subprocess.run([sys.executable, "-m", "requant.flows.cli", "convert", s3_tiny, clean_prefix, "--recipe",
                               "amd-kimi-mxfp4", *extra], env=env, capture_output=True, text=True, timeout=600)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("requant convert: error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert {f: storage.read_bytes(f) for f in before} == before


def test_mirror_once_then_convert_from_the_mirror(prefect_api, local_hub, tiny_local_reference, clean_prefix):
    """requantize with ``mirror``: the Hub revision is copied into S3 by Ray tasks (each file checked against the
    Hub's digest), converted from the copy to the same bytes, the inputs still verified against the Hub's sha256;
    a second mirror of the revision copies nothing."""
    from requant.flows.mirror import mirror_upstream

    mirror = f"{clean_prefix}-mirror"
    summary, _ = _run(upstream="hf://testorg/tiny@main", conversion={"mirror": mirror}, output=clean_prefix,
                      recipe="kimi-k2.6-mxfp4")
    commit = local_hub.commits["tiny"]
    assert summary.mirror["commit"] == commit and summary.mirror["copied"] == summary.mirror["files"] > 10
    _same_checkpoint(clean_prefix, tiny_local_reference)
    manifest = json.loads(S3Storage(clean_prefix).read_bytes("requant-manifest.json"))
    assert manifest["upstream"]["uri"] == f"hf://testorg/tiny@{commit}"
    assert all(d["verified_against_published"] for d in manifest["inputs"]["shards"].values())
    copy = S3Storage(mirror)
    assert copy.read_bytes("refs/main").decode().strip() == commit
    assert copy.read_bytes(f"snapshots/{commit}/config.json") == (local_hub.root / "testorg/tiny/commits" / commit /
                                                                   "config.json").read_bytes()
    again = mirror_upstream("hf://testorg/tiny@main", mirror)
    assert again["copied"] == 0 and again["files"] == summary.mirror["files"]
