"""``make ui`` / ``make ui-down`` / ``make deploy``: the Prefect UI on this machine.

``up`` starts SeaweedFS (unless already running), ``prefect server start`` bound to 127.0.0.1, the
``requant-process`` work pool and a process worker, seeds the synthetic upstream and a revision mirror
for the watcher, and registers the deployments of ``prefect.yaml``. Everything lives under
``.services/`` (Prefect's database included, via PREFECT_HOME); ``down`` stops what ``up`` started.
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

from requant import seaweed
from requant.processes import terminate_group

ROOT = Path(__file__).resolve().parents[1]
POOL = "requant-process"
MIRROR_REVISION = "synthetic-trained-seed0"


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


def seed(env: dict[str, str]) -> None:
    """The trained model's INT4 upstream (requantize's default) and a one-revision mirror of it (watch-upstream's
    default)."""
    from requant.io.s3 import S3Storage
    from requant.io.transfer import upload_dir
    from requant.synth import synthesize

    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    if S3Storage("s3://requant/upstream/trained").exists("config.json"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = synthesize(Path(tmp) / "trained", "trained", seed=0, progress=False)
        upload_dir(local, "s3://requant/upstream/trained")
        upload_dir(local, f"s3://requant/mirror/trained/snapshots/{MIRROR_REVISION}")
    S3Storage("s3://requant/mirror/trained").put_bytes("refs/main", MIRROR_REVISION.encode())


def up(state_dir: Path, port: int) -> dict:
    state_file = state_dir / "ui.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        print(f"already running: {state['ui_url']} (make ui-down stops it)")
        return state
    state_dir.mkdir(parents=True, exist_ok=True)
    sw_state = state_dir / "seaweed.json"
    server = seaweed.load_state(sw_state)
    started_seaweed = server is None
    if started_seaweed:
        server = seaweed.start(state_dir / "seaweed-data")
        seaweed.save_state(server, sw_state)
    env = {**os.environ, **server.env(), **prefect_env(state_dir, port)}
    log = state_dir / "prefect-server.log"
    with open(log, "ab") as out:
        srv = subprocess.Popen([_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    state = {"server_pid": srv.pid, "port": port, "ui_url": f"http://127.0.0.1:{port}",
             "api_url": env["PREFECT_API_URL"], "started_seaweed": started_seaweed, "worker_pid": None}
    state_file.write_text(json.dumps(state))
    _wait(f"http://127.0.0.1:{port}/api/health", 120, srv, log)
    seed(env)
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
    if state.get("started_seaweed"):
        server = seaweed.load_state(state_dir / "seaweed.json")
        if server is not None:
            seaweed.stop(server)
        (state_dir / "seaweed.json").unlink(missing_ok=True)
    state_file.unlink()
    print("Prefect server, worker" + (" and SeaweedFS" if state.get("started_seaweed") else "") + " stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "deploy"])
    parser.add_argument("--state-dir", default=".services", type=Path)
    parser.add_argument("--port", type=int, default=4200, help="Prefect server port (Prefect's default)")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(args.state_dir, args.port)
    elif args.command == "down":
        down(args.state_dir)
    else:                                             # against whatever PREFECT_API_URL points at
        deploy({**os.environ, "REQUANT_HOME": str(ROOT)})
        print("registered: requantize, evaluate, watch-upstream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
