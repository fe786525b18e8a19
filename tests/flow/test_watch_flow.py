"""watch-upstream on a real Prefect server with SeaweedFS as the ledger store: one requantize run per new
revision, also with two watchers at once; nothing when nothing changed; failed runs retried, then given up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.services

BARRIER_TIMEOUT_S = 60
# A watcher process. Its Ledger.claim first waits at a barrier (a folder each watcher adds a file to) until both
# watchers are there, or BARRIER_TIMEOUT_S has passed, and records when it arrived and when its claim started and
# ended: a watcher only claims once it decided to submit, so both are past their ledger read when the claims go out.
WATCH = f"""
import json, os, sys, time
from requant.watch import Ledger
from requant.flows.watch import watch_upstream

barrier, claim = sys.argv[4], Ledger.claim

def arrivals():
    return sum(name.startswith("arrived-") for name in os.listdir(barrier))

def claim_at_the_barrier(self, *args, **kwargs):
    arrived = time.time()
    open(os.path.join(barrier, f"arrived-{{os.getpid()}}"), "x").close()
    while arrivals() < 2 and time.time() < arrived + {BARRIER_TIMEOUT_S}:
        time.sleep(0.001)
    parties, start = arrivals(), time.time()
    won = claim(self, *args, **kwargs)
    with open(os.path.join(barrier, f"claim-{{os.getpid()}}.json"), "x") as f:
        json.dump({{"arrived": arrived, "parties": parties, "start": start, "end": time.time(), "won": won}}, f)
    return won

Ledger.claim = claim_at_the_barrier
print("RESULT " + json.dumps(watch_upstream(upstream=sys.argv[1], output_root=sys.argv[2], ledger=sys.argv[3])))
"""


@pytest.fixture(scope="module")
def deployment(prefect_api):
    """A requantize deployment without a worker: runs it is asked for stay scheduled, which is what we count."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("requantize")
        return client.create_deployment(flow_id=flow_id, name="requantize", entrypoint="flows/requantize.py:requantize")


def _runs(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def _set_state(run_id, state):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state=state, force=True)


def _watch(mirror, out, ledger):
    from requant.flows.watch import watch_upstream

    return watch_upstream(upstream=str(mirror), output_root=out, ledger=ledger)


def _two_watchers_at_once(prefect_api, upstream, out, ledger, tmp_path) -> list[dict]:
    """Two watcher processes started at the same moment; the result of each. Both must have raced for the claim:
    each decided to submit (a watcher that saw the other's claim waits without claiming), both reached the barrier
    before either claim went out, and the two claim windows (arrival at the barrier to the claim's answer)
    overlapped. Run one after the other, the first would wait out the barrier alone and the second would not claim."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    barrier = tempfile.mkdtemp(prefix="barrier-", dir=tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", WATCH, upstream, out, ledger, barrier], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.split("RESULT ", 1)[1]))
    claims = [json.loads(p.read_text()) for p in sorted(Path(barrier).glob("claim-*.json"))]
    assert len(claims) == 2, f"only {len(claims)} watcher(s) tried to claim: they did not race ({results})"
    assert [c["parties"] for c in claims] == [2, 2], f"a watcher waited out the barrier alone: {claims}"
    assert max(c["arrived"] for c in claims) <= min(c["start"] for c in claims), f"a claim went out early: {claims}"
    assert max(c["arrived"] for c in claims) < min(c["end"] for c in claims), f"the claims did not overlap: {claims}"
    assert max(c["start"] for c in claims) - min(c["start"] for c in claims) < 2.0, f"claims apart: {claims}"
    assert sorted(c["won"] for c in claims) == [False, True], claims
    return results


def test_one_run_per_new_revision_even_with_concurrent_watchers(prefect_api, s3_server, deployment, tmp_path):
    from prefect.states import Completed, Failed

    mirror, out, ledger = tmp_path / "mirror", "s3://outputs/watch", f"s3://ledger/{uuid.uuid4().hex[:8]}"
    (mirror / "refs").mkdir(parents=True)
    (mirror / "refs/main").write_text("rev-a")

    first = _watch(mirror, out, ledger)
    runs = _runs(deployment)
    assert first["action"] == "submitted" and len(runs) == 1
    assert runs[0].parameters["conversion"]["revision"] == "rev-a" and runs[0].parameters["upstream"] == f"{mirror}/snapshots/rev-a"
    assert runs[0].parameters["output"] == f"{out}/rev-a/kimi-k2.6-mxfp4"
    assert _watch(mirror, out, ledger)["action"] == "wait" and len(_runs(deployment)) == 1      # still scheduled
    _set_state(runs[0].id, Completed())
    assert _watch(mirror, out, ledger)["action"] == "done" and len(_runs(deployment)) == 1

    # A new revision and two watchers started at the same moment: one run.
    (mirror / "refs/main").write_text("rev-b")
    results = _two_watchers_at_once(prefect_api, str(mirror), out, ledger, tmp_path)
    assert sorted(r["action"] for r in results) == ["submitted", "wait"]
    new = [r for r in _runs(deployment) if r.parameters["conversion"]["revision"] == "rev-b"]
    assert len(new) == 1

    # A failed conversion is retried on the next tick, up to max_attempts (3), then given up, visibly.
    for attempt in (2, 3):
        _set_state(new[-1].id, Failed())
        retry = _watch(mirror, out, ledger)
        assert retry["action"] == "submitted" and retry["attempt"] == attempt
        new = sorted([r for r in _runs(deployment) if r.parameters["conversion"]["revision"] == "rev-b"], key=lambda r: r.created)
        assert len(new) == attempt
    _set_state(new[-1].id, Failed())
    gave_up = _watch(mirror, out, ledger)
    assert gave_up["action"] == "give-up" and "3 attempts failed" in gave_up["reason"]
    assert len([r for r in _runs(deployment) if r.parameters["conversion"]["revision"] == "rev-b"]) == 3


def test_new_commits_on_the_hub_are_converted_once_and_doc_only_commits_not(prefect_api, local_hub, tiny_upstream,
                                                                             deployment, tmp_path):
    """watch-upstream on hf://testorg/watched against the local Hub: a new commit starts one run (also with two
    watchers at once); a commit that changes only the README and a comment in the model code is recorded as
    "weights unchanged since <commit>"; a config change that alters the output is converted."""
    from prefect.states import Completed

    from requant.testing.hubserver import publish, publish_dir

    upstream, out, ledger = "hf://testorg/watched", "s3://outputs/watch-hub", f"s3://ledger/{uuid.uuid4().hex[:8]}"
    first = publish_dir(local_hub.root, "testorg/watched", tiny_upstream)
    result = _watch(upstream, out, ledger)
    runs = [r for r in _runs(deployment) if r.parameters["conversion"]["revision"] == first]
    assert result["action"] == "submitted" and len(runs) == 1
    assert runs[0].parameters["upstream"] == f"hf://testorg/watched@{first}"
    assert local_hub.token not in json.dumps(runs[0].parameters)
    _set_state(runs[0].id, Completed())

    code = (tiny_upstream / "configuration_kimi_k25.py").read_text()
    docs = publish(local_hub.root, "testorg/watched", {
        "README.md": b"# Fixed a typo\n", "configuration_kimi_k25.py": ("# a corrected comment\n" + code).encode()})
    same = _watch(upstream, out, ledger)
    assert (same["revision"], same["action"], same["reason"]) == (docs, "unchanged", f"weights unchanged since {first}")
    assert same["output"] == f"{out}/{first}/kimi-k2.6-mxfp4"
    assert _watch(upstream, out, ledger)["action"] == "unchanged"
    assert not [r for r in _runs(deployment) if r.parameters["conversion"]["revision"] == docs]

    config = json.loads((tiny_upstream / "config.json").read_text())
    config["text_config"]["rope_theta"] = config["text_config"].get("rope_theta", 10000.0) * 2
    changed = publish(local_hub.root, "testorg/watched", {"config.json": json.dumps(config, indent=2).encode()})
    results = _two_watchers_at_once(prefect_api, upstream, out, ledger, tmp_path)
    assert sorted(r["action"] for r in results) == ["submitted", "wait"]
    assert len([r for r in _runs(deployment) if r.parameters["conversion"]["revision"] == changed]) == 1


def test_a_revision_that_changes_its_source_format_is_converted_with_the_same_recipe(prefect_api, local_hub,
                                                                                    deployment, tmp_path):
    """hf://testorg/formats publishes INT4, then MXFP4, then FP8 blocks, then INT4 again (K2.6's next release may
    change format): each revision starts one run with the same recipe, the watcher's reason and the ledger say
    which format changed into which, and the run's own parameters convert it (the manifest records the format)."""
    from prefect.states import Completed

    import requant
    from requant.io.storage import open_storage
    from requant.manifest import read_manifest
    from requant.testing.hubserver import publish_dir
    from requant.testing.synth import synthesize
    from requant.watch import Ledger

    upstream, out, ledger = "hf://testorg/formats", "s3://outputs/watch-formats", f"s3://ledger/{uuid.uuid4().hex[:8]}"
    before = None
    for i, source in enumerate(("int4", "mxfp4", "fp8-block", "int4")):
        local = synthesize(tmp_path / f"upstream-{i}", "tiny", seed=i, progress=False, source=source)
        commit = publish_dir(local_hub.root, "testorg/formats", local)
        result = _watch(upstream, out, ledger)
        assert (result["revision"], result["action"], result["source"]) == (commit, "submitted", source)
        change = f"source format {before} -> {source}"
        assert (change in result["reason"]) == (before is not None), result["reason"]
        assert Ledger(ledger).source(commit) == source
        (run,) = [r for r in _runs(deployment) if r.parameters["upstream"] == f"{upstream}@{commit}"]
        assert run.parameters["recipe"] == "kimi-k2.6-mxfp4"
        converted = tmp_path / f"converted-{i}"
        requant.convert(run.parameters["upstream"], str(converted), run.parameters["recipe"], progress=False)
        requant.verify(str(converted))
        assert read_manifest(open_storage(str(converted)))["source"]["format"] == source
        _set_state(run.id, Completed())
        before = source
