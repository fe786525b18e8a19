"""State and services shared by the flow tests and their conftest (a uniquely named module: several
conftest.py exist). Everything here acts on processes this test session started, never on others of the
host: the S3 server by its PID, the Ray cluster by the process trees of its own `ray start --block`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from requant.testing import seaweed

RAY = str(Path(sys.executable).with_name("ray"))


class S3Service:
    """The session's S3 server. A test that restarts it replaces ``current``, so later restarts and the
    session's teardown act on the live process, never on one already replaced."""

    def __init__(self, server: seaweed.SeaweedServer):
        self.current = server

    def restart(self, pause: float = 2.0) -> seaweed.SeaweedServer:
        self.current = seaweed.restart(self.current, grace=1.0, pause=pause)
        return self.current

    def stop(self) -> None:
        seaweed.stop(self.current)

    def __getattr__(self, name):  # endpoint, env(), data_dir, ports, ... of the live server
        return getattr(self.current, name)


class RayCluster:
    """A head and worker nodes on loopback, each a `ray start --block` child of this process."""

    def __init__(self, port: int, env: dict[str, str], log_dir: Path):
        self.address = f"127.0.0.1:{port}"
        self.env = env
        self.log_dir = log_dir
        self.nodes: list[subprocess.Popen] = []

    def start(self, workers: dict[str, dict[str, float]], timeout: float = 180.0) -> RayCluster:
        """Nodes one at a time (two raylets starting together on 2 cores time out), each up when its
        `ray start` says so."""
        common = ["--block", "--disable-usage-stats", "--num-cpus=1", "--node-ip-address=127.0.0.1"]
        port = self.address.rsplit(":", 1)[1]
        self._spawn([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], timeout)
        for resources in workers.values():
            resources_arg = "{" + ",".join(f'"{k}": {v}' for k, v in resources.items()) + "}"
            self._spawn([RAY, "start", f"--address={self.address}", f"--resources={resources_arg}", *common], timeout)
        return self

    def _spawn(self, args: list[str], timeout: float) -> None:
        log = self.log_dir / f"ray-node-{len(self.nodes)}.log"
        with open(log, "wb") as out:
            node = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if node.poll() is not None:
                raise RuntimeError(f"ray node exited during start: {args}\n{text[-3000:]}")
            if "Ray runtime started" in text:
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray node did not start in {timeout:.0f}s: {args}")

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster (the `ray start` processes and all their descendants)."""
        found = []
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                found += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found

    def workers(self, *markers: str) -> list[int]:
        """PIDs of this cluster's worker processes whose command line contains one of ``markers``."""
        pids = []
        for proc in self.processes():
            try:
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if any(marker in cmdline for marker in markers):
                pids.append(proc.pid)
        return pids

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM each `ray start --block` (it shuts its node down), then SIGKILL whatever of ours is left."""
        tree = self.processes()
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for node in self.nodes:
            try:
                node.wait(5)
            except subprocess.TimeoutExpired:
                pass
