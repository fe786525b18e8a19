"""Serving engines as Ray actors: on a cluster the smoke test and GSM8K need an engine on a GPU node, not
in the flow's process. The actor launches the engine (requant.engines.engines) on its node, bound to the
node's address, and stops it when the evaluation ends. The API key comes from the node's environment.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from requant.api_key import api_key
from requant.engines.engines import RunningEngine, launch, load_engines


class _EngineHost:
    def start(self, engine: str, engines_file: str | None, model: str, served_model_name: str, tp: int,
              max_model_len: int) -> tuple[str, str]:
        self.log_dir = tempfile.mkdtemp(prefix="requant-engine-")
        spec = load_engines(engines_file)[engine]
        self.engine = launch(spec, model, served_model_name=served_model_name, log_dir=self.log_dir,
                             host=ray.util.get_node_ip_address(), tp=tp, max_model_len=max_model_len,
                             api_key=api_key())
        return self.engine.base_url, ray.get_runtime_context().get_node_id()

    def stop(self) -> None:
        self.engine.stop()


@contextmanager
def ray_engine(engine: str, engines_file: str | None, model: str, served_model_name: str, tp: int,
               max_model_len: int, num_gpus: float, resources: dict[str, float] | None = None) -> Iterator[RunningEngine]:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False, include_dashboard=False)
    actor_cls = ray.remote(num_cpus=0, num_gpus=num_gpus, resources=resources or {}, max_restarts=0)(_EngineHost)
    actor = actor_cls.remote()
    try:
        base_url, node = ray.get(actor.start.remote(engine, engines_file, model, served_model_name, tp, max_model_len))
        yield RunningEngine(base_url, served_model_name, f"{engine} (ray actor on node {node[:12]})",
                            api_key=api_key())
    finally:
        try:
            ray.get(actor.stop.remote(), timeout=60)
        finally:
            ray.kill(actor)
