"""`make ui` for real: a Prefect server on loopback, SeaweedFS, the prefect.yaml deployments, a process worker.
A requantize deployment run goes through the worker, then headless Chromium must show it in the UI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from artifacts import artifacts_dir

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_shell_env() -> dict[str, str]:
    """`make ui` as a user runs it: without the test session's Ray cluster (RAY_ADDRESS) or S3 identity
    (AWS_*), which other test modules may have exported; the stack brings its own of both."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "HF_"))}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("ui")
    port = _free_port()
    up = subprocess.run([sys.executable, "-m", "dev.ui", "up", "--state-dir", str(state_dir), "--port", str(port),
                         "--hub-port", str(_free_port())],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_user_shell_env())
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield json.loads((state_dir / "ui.json").read_text()) | {"state_dir": state_dir}
    finally:
        subprocess.run([sys.executable, "-m", "dev.ui", "down", "--state-dir", str(state_dir)], cwd=ROOT,
                       capture_output=True, timeout=120, env=_user_shell_env())


def _client_settings(ui):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: ui["api_url"]})


def _page(url: str, expect: list[str], screenshot: Path) -> str:
    """Render ``url`` in headless Chromium until every ``expect`` string is in the DOM (the UI loads data
    asynchronously); keep a screenshot. Fails with what was missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required for the UI test (make test installs it with apt-get)"
    dom = ""
    for budget in (10000, 20000, 40000):
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--virtual-time-budget={budget}",
                "--window-size=1440,1000"]
        dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
        if all(e in dom for e in expect):
            subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
            return dom
    missing = [e for e in expect if e not in dom]
    raise AssertionError(f"{url}: {missing} not shown ({len(dom)} bytes of DOM)")


def test_deploy_registers_three_deployments_with_the_schedule(ui):
    from prefect.client.orchestration import get_client

    with _client_settings(ui), get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        assert set(deployments) >= {"requantize", "evaluate", "watch-upstream"}
        assert all(d.work_pool_name == "requant-process" for d in deployments.values())
        schedules = deployments["watch-upstream"].schedules
        assert [s.schedule.cron for s in schedules] == ["0 */6 * * *"] and schedules[0].active
        assert deployments["requantize"].parameters["recipe"] == "kimi-k2.6-mxfp4"
        assert deployments["requantize"].entrypoint == "requant.flows.requantize:requantize"


def test_deployment_run_through_the_worker_then_the_ui_shows_it(ui, monkeypatch):
    from prefect.deployments import run_deployment

    from requant.testing.seaweed import load_state
    from requant.verification import verify

    with _client_settings(ui):
        run = run_deployment("requantize/requantize", parameters={"evaluation": {"enabled": False}, "progress": False}, timeout=900)
    assert run.state.is_completed(), run.state
    for name, value in load_state(ui["state_dir"] / "seaweed.json").env().items():
        monkeypatch.setenv(name, value)                    # restored after the test
    verify("s3://requant/checkpoints/trained/kimi-k2.6-mxfp4")

    SCREENSHOTS = artifacts_dir("prefect-ui")
    _page(f"{ui['ui_url']}/deployments", ["requantize", "evaluate", "watch-upstream"],
          SCREENSHOTS / "prefect-ui-deployments.png")
    _page(f"{ui['ui_url']}/runs", [run.name, "Completed"], SCREENSHOTS / "prefect-ui-runs.png")
    _page(f"{ui['ui_url']}/runs/flow-run/{run.id}", [run.name, "Completed"], SCREENSHOTS / "prefect-ui-flow-run.png")
    _page(f"{ui['ui_url']}/artifacts", ["requantize-summary", "requantize-jobs", "requantize-progress"],
          SCREENSHOTS / "prefect-ui-artifacts.png")
    assert (SCREENSHOTS / "prefect-ui-runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


RELEASE_REPO = "requant-local/Kimi-K2.6-trained-MXFP4"  # prefect.yaml's watch-upstream release_to
# The watcher's parameters as deployed, with a shorter GSM8K run (one seed, a few items of the trained model's task).
WATCHED = {"evaluation": {"limit": 5, "seeds": [42], "gsm8k_dir": "requant:trained"},
           "release_to": f"hf://{RELEASE_REPO}", "progress": False}


def test_scheduled_watcher_deployment_releases_a_new_revision_through_the_worker(ui, tmp_path):
    """watch-upstream as deployed (the 6-hourly schedule's flow, releasing to the local Hub), run by the worker
    against the local Hub that `make ui` seeds: it starts requantize for the commit of hf://synthetic/trained, which
    the worker converts, evaluates (a short GSM8K run) and, on PASS, releases as one commit on the local Hub; the
    ledger shows that commit's URL. Then a README-only commit published with `requant hub publish` is recorded as
    "weights unchanged" and released nothing new, in the UI."""
    import time

    from huggingface_hub import HfApi
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    hub = HfApi(endpoint=ui["hub_url"], token=False)

    with _client_settings(ui):
        watch = run_deployment("watch-upstream/watch-upstream", timeout=600,
                               parameters={"parameters": WATCHED})
        assert watch.state.is_completed(), watch.state
        deadline = time.monotonic() + 600
        with get_client(sync_client=True) as client:
            started = [r for r in client.read_flow_runs() if r.parameters.get("conversion", {}).get("revision") == ui["hub_commit"]]
            assert len(started) == 1, started               # the watcher started exactly one conversion
            while True:
                run = client.read_flow_run(started[0].id)
                if run.state.is_final() or time.monotonic() > deadline:
                    break
                time.sleep(3)
            assert run.state.is_completed(), run.state
            assert run.parameters["output"] == f"s3://requant/revisions/trained/{ui['hub_commit']}/kimi-k2.6-mxfp4"
            assert run.parameters["upstream"] == f"hf://synthetic/trained@{ui['hub_commit']}"
            released = [c.commit_id for c in hub.list_repo_commits(RELEASE_REPO)]
            assert len(released) == 2                        # the repository's initial commit and the release
            again = run_deployment("watch-upstream/watch-upstream", timeout=600,
                                   parameters={"parameters": WATCHED})
            assert again.state.is_completed()
            rerun = [r for r in client.read_flow_runs() if r.parameters.get("conversion", {}).get("revision") == ui["hub_commit"]]
            assert len(rerun) == 1                           # converted: nothing new to start
            ledger = [a for a in client.read_artifacts() if a.key == "upstream-ledger" and a.flow_run_id == again.id]
            assert f"released {ui['hub_url']}/{RELEASE_REPO}/commit/{released[0]}" in str(ledger[0].data)
            snapshot = Path(ui["hub_root"]) / "synthetic/trained/commits" / ui["hub_commit"]
            docs = tmp_path / "docs-only"
            shutil.copytree(snapshot, docs)
            (docs / "README.md").write_text("# The trained upstream\n\nA corrected sentence.\n")
            publish = subprocess.run([str(Path(sys.executable).with_name("requant")), "hub", "publish", ui["hub_root"],
                                      "synthetic/trained", str(docs)], capture_output=True, text=True, check=True)
            new_commit = publish.stdout.split()[-1]
            same = run_deployment("watch-upstream/watch-upstream", timeout=600,
                                  parameters={"parameters": WATCHED})
            assert same.state.is_completed()
            assert not [r for r in client.read_flow_runs() if r.parameters.get("conversion", {}).get("revision") == new_commit]
            ledger = [a for a in client.read_artifacts() if a.key == "upstream-ledger" and a.flow_run_id == same.id]
            assert len(ledger) == 1 and f"weights unchanged since {ui['hub_commit']}" in str(ledger[0].data)
            assert [c.commit_id for c in hub.list_repo_commits(RELEASE_REPO)] == released   # no new release
    _page(f"{ui['ui_url']}/artifacts/artifact/{ledger[0].id}", [f"weights unchanged since {ui['hub_commit']}"],
          artifacts_dir("prefect-ui") / "prefect-ui-upstream-ledger.png")
    _page(f"{ui['ui_url']}/deployments/deployment/{run.deployment_id}", ["requantize"],
          artifacts_dir("prefect-ui") / "prefect-ui-requantize-deployment.png")
