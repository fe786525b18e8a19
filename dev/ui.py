"""``make ui`` / ``make ui-down`` / ``make deploy``: the Prefect UI on this machine.

``up`` starts SeaweedFS (unless already running), ``prefect server start`` bound to 127.0.0.1, a local Hugging
Face Hub (``requant hub serve``, the watcher's upstream), the ``requant-process`` work pool and a process worker,
seeds the synthetic upstream in S3 and as the Hub repository ``synthetic/trained``, and registers the deployments
of ``prefect.yaml``. Everything lives under ``.services/`` (Prefect's database and the Hub's repositories
included); ``down`` stops what ``up`` started. A new upstream revision for the watcher to pick up:
``requant hub publish .services/hub synthetic/trained DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from requant.processes import terminate_group
from requant.testing import seaweed

ROOT = Path(__file__).resolve().parents[1]
POOL = "requant-process"
HUB_REPO = "synthetic/trained"  # watch-upstream's default upstream in prefect.yaml: hf://synthetic/trained
# The stack's own Hub token: the local Hub takes uploads (watch-upstream's releases) only with it, and the worker's
# HF_TOKEN is it, so a token of the user's for the real Hub never reaches the local one.
LOCAL_HUB_TOKEN = "hf_requant_local_write"


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _wait(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"prefect server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"prefect server not healthy after {timeout:.0f}s; see {log}")


def prefect_env(state_dir: Path, port: int) -> dict[str, str]:
    return {"PREFECT_HOME": str((state_dir / "prefect-home").resolve()),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "REQUANT_HOME": str(ROOT), "RAY_AUTH_MODE": "disabled"}


def deploy(env: dict[str, str]) -> None:
    """Create the process work pool (idempotent) and register every deployment in prefect.yaml."""
    subprocess.run([_prefect(), "work-pool", "create", POOL, "--type", "process", "--overwrite"], env=env, cwd=ROOT,
                   check=True, capture_output=True)
    proc = subprocess.run([_prefect(), "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"prefect deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def seed(env: dict[str, str], hub_root: Path) -> str:
    """The trained model's INT4 upstream in S3 (requantize's default) and as the Hub repository the watcher
    follows; returns the Hub commit of ``main``."""
    from requant.io.s3 import S3Storage
    from requant.io.transfer import upload_dir
    from requant.testing.hubserver import publish_dir
    from requant.testing.synth import synthesize

    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    head = hub_root / HUB_REPO / "refs" / "main"
    if S3Storage("s3://requant/upstream/trained").exists("config.json") and head.is_file():
        return head.read_text().strip()
    with tempfile.TemporaryDirectory() as tmp:
        local = synthesize(Path(tmp) / "trained", "trained", seed=0, progress=False)
        upload_dir(local, "s3://requant/upstream/trained")
        return publish_dir(hub_root, HUB_REPO, local, message="The trained model's INT4 upstream")


def _start_hub(state_dir: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    hub_root = state_dir / "hub"
    hub_root.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "hub.log", "ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("requant")), "hub", "serve", str(hub_root),
                                 "--port", str(port), "--write-token", LOCAL_HUB_TOKEN], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the local Hub exited ({proc.returncode}); see {state_dir / 'hub.log'}")
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/api/models/{HUB_REPO}", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.3)
            continue
        # the Hub answers JSON (404 before the repository is seeded); anything else is another server on the port
        if answer.headers.get("content-type", "").startswith("application/json") and proc.poll() is None:
            return proc
        time.sleep(0.3)
    raise SystemExit(f"the local Hub did not answer on port {port}; see {state_dir / 'hub.log'}")


def up(state_dir: Path, port: int, hub_port: int = 8090) -> dict:
    state_file = state_dir / "ui.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        print(f"already running: {state['ui_url']} (make ui-down stops it)")
        return state
    state_dir.mkdir(parents=True, exist_ok=True)
    hub_env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    # the Hub binds its port before SeaweedFS picks free ones, which could otherwise take it
    hub = _start_hub(state_dir, hub_port, hub_env)
    sw_state = state_dir / "seaweed.json"
    server = seaweed.load_state(sw_state)
    started_seaweed = server is None
    if started_seaweed:
        try:
            server = seaweed.start(state_dir / "seaweed-data")
        except BaseException:
            _kill(hub.pid)  # nothing records it yet
            raise
        seaweed.save_state(server, sw_state)
    env = {**os.environ, **server.env(), **prefect_env(state_dir, port),
           "HF_ENDPOINT": f"http://127.0.0.1:{hub_port}", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_TOKEN": LOCAL_HUB_TOKEN}
    log = state_dir / "prefect-server.log"
    with open(log, "ab") as out:
        srv = subprocess.Popen([_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    state = {"server_pid": srv.pid, "port": port, "ui_url": f"http://127.0.0.1:{port}",
             "api_url": env["PREFECT_API_URL"], "started_seaweed": started_seaweed, "worker_pid": None,
             "hub_pid": None, "hub_url": env["HF_ENDPOINT"], "hub_root": str((state_dir / "hub").resolve())}
    state_file.write_text(json.dumps(state))
    state["hub_pid"] = hub.pid
    state_file.write_text(json.dumps(state))
    _wait(f"http://127.0.0.1:{port}/api/health", 120, srv, log)
    state["hub_commit"] = seed(env, state_dir / "hub")
    state_file.write_text(json.dumps(state))
    deploy(env)
    with open(state_dir / "prefect-worker.log", "ab") as out:
        worker = subprocess.Popen([_prefect(), "worker", "start", "--pool", POOL, "--type", "process"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    state["worker_pid"] = worker.pid
    state_file.write_text(json.dumps(state))
    print(f"Prefect UI: {state['ui_url']}  (deployments: requantize, evaluate, watch-upstream; worker on {POOL})")
    print(f"export PREFECT_API_URL={state['api_url']}")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    print(f"export HF_ENDPOINT={state['hub_url']}   # the local Hub; watch-upstream follows hf://{HUB_REPO}")
    print(f"new upstream revision: requant hub publish {state['hub_root']} {HUB_REPO} DIR")
    print(f"releases: {state['hub_url']}/api/models/requant-local/Kimi-K2.6-trained-MXFP4 (HF_TOKEN={LOCAL_HUB_TOKEN})")
    return state


def _kill(pid: int | None, grace: float = 10.0) -> None:
    if pid:
        terminate_group(pid, grace)


def down(state_dir: Path) -> None:
    state_file = state_dir / "ui.json"
    if not state_file.exists():
        print("nothing to stop")
        return
    state = json.loads(state_file.read_text())
    _kill(state.get("worker_pid"))
    _kill(state.get("server_pid"))
    _kill(state.get("hub_pid"))
    if state.get("started_seaweed"):
        server = seaweed.load_state(state_dir / "seaweed.json")
        if server is not None:
            seaweed.stop(server)
        (state_dir / "seaweed.json").unlink(missing_ok=True)
    state_file.unlink()
    print("Prefect server, worker, local Hub" + (" and SeaweedFS" if state.get("started_seaweed") else "") + " stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "deploy"])
    parser.add_argument("--state-dir", default=".services", type=Path)
    parser.add_argument("--port", type=int, default=4200, help="Prefect server port (Prefect's default)")
    parser.add_argument("--hub-port", type=int, default=8090, help="the local Hub's port")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(args.state_dir, args.port, args.hub_port)
    elif args.command == "down":
        down(args.state_dir)
    else:                                             # against whatever PREFECT_API_URL points at
        deploy({**os.environ, "REQUANT_HOME": str(ROOT)})
        print("registered: requantize, evaluate, watch-upstream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
