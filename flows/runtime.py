"""Where the flows run: the Ray task runner, the Ray settings a flow run takes from its environment, and this
process's ephemeral Prefect server. Entry points (the ``requant`` console script, ``dev/run.py``, the benchmarks)
and every flow import it; it imports no flow."""

from __future__ import annotations

import os
import re
from typing import Any

from prefect_ray.task_runners import RayTaskRunner

from requant import settings

# Never copied into Ray's runtime environment (visible in Ray's job metadata and dashboard).
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


def ray_settings() -> tuple[str | None, dict[str, Any]]:
    """Ray address and ``ray.init`` arguments from the environment of the flow run (not of the import)."""
    address = os.environ.get("RAY_ADDRESS") or None
    # Workers need the object-store endpoint; credentials are expected on the nodes themselves
    # (instance roles, mounted secrets), so they are not copied into Ray's runtime environment.
    # The same for the Hub: its endpoint and client settings travel, HF_TOKEN does not.
    forwarded = {k: v for k, v in os.environ.items()
                 if (k.startswith(("AWS_ENDPOINT_URL", "REQUANT_", "HF_HUB_")) or k in ("AWS_REGION", "HF_ENDPOINT"))
                 and not SECRET_NAME.search(k)}
    init_kwargs: dict[str, Any] = {"log_to_driver": False, "runtime_env": {"env_vars": forwarded},
                                   "namespace": "prefect"}
    if not address:
        # "local": always a fresh instance; a bare ray.init() would attach to any `ray start` cluster on the host
        init_kwargs["address"] = "local"
        init_kwargs["include_dashboard"] = False
        init_kwargs["num_cpus"] = settings.RAY_CPUS.get() or os.cpu_count() or 1
        api = ephemeral_api_url()
        if api:
            forwarded["PREFECT_API_URL"] = api
    return address, init_kwargs


def ephemeral_api_url() -> str | None:
    """The URL of the ephemeral Prefect server this process runs its flow against (no ``PREFECT_API_URL``
    set), if it is running. Local Ray workers are pointed at it: otherwise each worker process starts an
    ephemeral server of its own on the first task it runs (seconds of start-up and ~7 CPU-seconds each, measured
    on the layer benchmark; several at once time out)."""
    server = _ephemeral_server()
    return server.api_url if server is not None and server.running else None


def _ephemeral_server():
    """Prefect's ephemeral server of this process (the instance its ``get_client()`` starts and reuses), or
    None when ``PREFECT_API_URL`` names an API."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer()


# Prefect waits 20 s for its ephemeral server to answer. On a fresh PREFECT_HOME the server first creates and
# migrates its database: 14 s on an idle 2-core machine here, over 20 s on a loaded one (a CI run failed so).
EPHEMERAL_STARTUP_S = 120


def start_ephemeral_server() -> str | None:
    """With no ``PREFECT_API_URL``, start this process's ephemeral Prefect server now, waiting for it up to
    ``EPHEMERAL_STARTUP_S`` (or Prefect's own setting where that is longer); flows the process runs afterwards
    use this server. Entry points call it before their first flow. Returns its API URL, or None when an API is
    configured."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = _ephemeral_server()
    if server is None:
        return None
    server.start(timeout=max(EPHEMERAL_STARTUP_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    return server.api_url


def stop_ephemeral_server() -> None:
    """Stop this process's ephemeral server now, while the entry point still owns the terminal (Prefect would stop
    it at exit and log that after everything else). The flow runs' queued log records are sent to it first."""
    server = _ephemeral_server()
    if server is not None:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
        server.stop()


class EnvRayTaskRunner(RayTaskRunner):
    """prefect-ray's runner, configured when a flow run enters it: ``RAY_ADDRESS`` (join a cluster) or a
    local Ray, as the environment says at that moment. Built at import time, the flow would keep whatever
    Ray the first importer's environment named."""

    def __init__(self) -> None:
        super().__init__()

    def duplicate(self) -> EnvRayTaskRunner:
        return type(self)()

    def __enter__(self):
        self.address, self.init_kwargs = ray_settings()
        return super().__enter__()


def worker_slots(reserved: dict[str, Any]) -> int:
    """How many layer jobs the Ray cluster this flow runs on can hold at once, each reserving ``reserved`` (the
    layer jobs' ``ray_options``): on each alive node, the fewest of its CPUs, GPUs and custom resources over what a
    job takes of each; 0 outside Ray."""
    import ray

    if not ray.is_initialized():
        return 0
    needs = {"CPU": reserved.get("num_cpus") or 0, "GPU": reserved.get("num_gpus") or 0,
             **(reserved.get("resources") or {})}
    needs = {name: amount for name, amount in needs.items() if amount > 0}
    slots = 0
    for node in ray.nodes():
        if node.get("Alive") and needs:
            have = node.get("Resources", {})
            slots += min(int(have.get(name, 0) / amount + 1e-9) for name, amount in needs.items())
    return slots
