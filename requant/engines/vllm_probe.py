"""A vLLM plugin that records what vLLM decides for each layer of a checkpoint, inside vLLM's own loader.

This file runs in the engine's environment, not requant's: it imports only the standard library and vLLM.
``requant.engines.vllm_cpu.probe_env`` registers it as a ``vllm.general_plugins`` entry point (a dist-info
folder on PYTHONPATH) and sets ``REQUANT_VLLM_PROBE`` to a JSON-lines file. vLLM loads general plugins in
every process it starts, so the hooks are in place in the engine-core process before it builds the model,
whichever way the server was started. Nothing in vLLM is re-implemented; some of its functions are wrapped:

- ``LinearBase.__init__``, ``RoutedExperts.__init__`` and ``VocabParallelEmbedding.__init__``: the
  quantization method (and Quark scheme) each layer was built with, including the router, which vLLM builds
  without asking the quantization config;
- ``QuarkConfig.get_quant_method_target``: the weight and activation keys Quark's config chose per prefix;
- ``get_quant_method`` of compressed-tensors' and Model Optimizer's configs: the method each chose per prefix,
  also where constructing that method raised (its class is read off the failing constructor's frame);
- ``BaseModelLoader.load_model`` (in the worker: build layers, load weights, prepare kernels),
  ``Executor.__init__`` and ``EngineCore._initialize_kv_caches`` (profile, warm up): where start-up stops and
  vLLM's own message. The innermost failure is written first.

Each record is one JSON line: ``{"kind": "layer" | "target" | "stopped" | "ready" | "decided" | "failed" |
"done", "pid": ..., ...}``.

Run as a script (``python requant_vllm_probe.py JOBS.json``), it starts vLLM's engine on several checkpoints in
turn in its own process (:func:`probe_many`): vLLM is imported once for all of them, and no engine-core or worker
process is started, where ``vllm serve`` starts three processes that each import vLLM for every checkpoint.

Where start-up stops early (on a CPU, at the first layer without a kernel), the layers never built can still be
decided by the same live config object, inside the failing loader: with ``REQUANT_VLLM_PROBE_LAYERS``
naming the records of a run that built every layer of the same architecture (e.g. the BF16 variant), each
layer not built yet gets a ``decided`` record before the error propagates: from ``get_quant_method_target`` (and
``get_scheme_cls``) of a ``QuarkConfig``; from any other config's own ``get_quant_method``, asked with a layer of
the same class this run built (or tried to) and the unbuilt layer's prefix. A layer type this run built without
consulting the config (vLLM's router) keeps that decision.
"""

from __future__ import annotations

import inspect
import json
import os
import traceback

ENV = "REQUANT_VLLM_PROBE"
LAYERS_ENV = "REQUANT_VLLM_PROBE_LAYERS"

# Stages of vLLM's start-up, by a vLLM function the failing traceback passes through (innermost wins).
STAGES = {
    "weight_loader": "load_weights",
    "load_weights": "load_weights",
    "process_weights_after_loading": "prepare_kernels",
    "initialize_model": "build_layers",
    "determine_available_memory": "profile",
    "profile_run": "profile",
    "compile_or_warm_up_model": "warm_up",
    "load_model": "build_layers",
}

_installed = False
# this process: the quantization config, the layers built (prefix -> class), the prefixes the config was asked
# about, and one layer object of each class it was asked about (to ask it again for a layer never built)
_live: dict = {"config": None, "layers": {}, "targets": set(), "samples": {}}


def _write(record: dict) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({**record, "pid": os.getpid()}) + "\n"
    with open(path, "a") as f:  # one short append per record: lines from several processes stay whole
        f.write(line)


def _name(obj) -> str | None:
    return None if obj is None else type(obj).__name__


def _stopped(exc: BaseException, default_stage: str) -> dict:
    stage, where = default_stage, ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if "/vllm/" in frame.filename and frame.name in STAGES:
            stage, where = STAGES[frame.name], f"{frame.filename.split('/vllm/', 1)[-1]}:{frame.lineno} {frame.name}"
            break
    message = " ".join(f"{type(exc).__name__}: {exc}".split())  # pydantic puts the cause on a second line
    return {"kind": "stopped", "stage": stage, "where": where, "error": message[:4000]}


def _observe_layers(cls, attribute: str) -> None:
    """Record each layer ``cls.__init__`` builds; its module name is the ``attribute`` argument (prefix, layer_name)."""
    original = cls.__init__
    signature = inspect.signature(original)

    def prefix_of(self, args, kwargs) -> str:
        try:
            value = signature.bind_partial(self, *args, **kwargs).arguments.get(attribute)
        except TypeError:
            value = None
        return str(value if value is not None else getattr(self, attribute, ""))

    def __init__(self, *args, **kwargs):
        try:
            original(self, *args, **kwargs)
        except Exception as exc:
            _live["layers"][prefix_of(self, args, kwargs)] = type(self).__name__
            _write({"kind": "layer", "prefix": prefix_of(self, args, kwargs), "layer_type": type(self).__name__,
                    "quant_method": None, "scheme": None, "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:4000]})
            raise
        # Subclasses call this base __init__ once; it sets prefix, quant_method and (Quark) scheme.
        prefix = prefix_of(self, args, kwargs)
        _live["layers"][prefix] = type(self).__name__
        _write({"kind": "layer", "prefix": prefix, "layer_type": type(self).__name__,
                "quant_method": _name(getattr(self, "quant_method", None)),
                "scheme": _name(getattr(self, "scheme", None)), "error": None})

    cls.__init__ = __init__


def _subclasses(root) -> dict[str, type]:
    found, todo = {root.__name__: root}, [root]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__name__ not in found:
                found[sub.__name__] = sub
                todo.append(sub)
    return found


def _method_in(exc: BaseException) -> str | None:
    """The quantization method whose constructor raised ``exc``: the ``self`` of the outermost ``__init__`` frame of
    the traceback that is a vLLM ``QuantizeMethodBase`` (e.g. an NVFP4 MoE method finding no kernel backend)."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), QuantizeMethodBase):
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def _ask(config, layer, prefix: str) -> str | None:
    """What ``config.get_quant_method`` (unwrapped) decides for ``layer`` under ``prefix``: the method's class, vLLM's
    unquantized default where it returns None, or the class whose constructor raised."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    ask = getattr(type(config).get_quant_method, "__wrapped__", type(config).get_quant_method)
    try:
        method = ask(config, layer, prefix)
    except Exception as exc:
        return _method_in(exc)
    if method is None:  # what LinearBase / RoutedExperts / VocabParallelEmbedding fall back to
        return ("UnquantizedFusedMoEMethod" if isinstance(layer, RoutedExperts) else
                "UnquantizedEmbeddingMethod" if "Embedding" in type(layer).__name__ else "UnquantizedLinearMethod")
    return type(method).__name__


def _decide_rest() -> None:
    """Decide, with this process's live config, every layer of REQUANT_VLLM_PROBE_LAYERS not built here."""
    config, path = _live["config"], os.environ.get(LAYERS_ENV)
    if config is None or not path or not os.path.exists(path):
        return
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.quark.quark import QuarkConfig, QuarkLinearMethod

    types = {**_subclasses(LinearBase), **_subclasses(RoutedExperts)}
    # types this run built without asking the config (e.g. GateLinear): vLLM builds them so everywhere
    unconfigured = {t for p, t in _live["layers"].items() if p not in _live["targets"]}
    with open(path) as f:
        reference = [json.loads(line) for line in f if line.strip()]
    for layer in reference:
        prefix, type_name = layer.get("prefix"), layer.get("layer_type")
        if layer.get("kind") != "layer" or prefix in _live["layers"] or type_name not in types:
            continue
        record = {"kind": "decided", "prefix": prefix, "layer_type": type_name, "scheme": None, "weight_key": None}
        if type_name in unconfigured:
            record["target"] = layer.get("quant_method")
        elif not isinstance(config, QuarkConfig):
            sample = _live["samples"].get(type_name)
            if sample is None:  # no layer of this class was built or tried: nothing to ask the config with
                record["target"] = None
            else:
                record["target"] = _ask(config, sample, prefix)
        else:
            layer_type = types[type_name]
            weight_key, _, method = config.get_quant_method_target(prefix, layer_type)
            record["target"] = None if method is None else method.__name__
            record["weight_key"] = None if weight_key is None else str(weight_key)
            if method is QuarkLinearMethod:
                record["scheme"] = config.get_scheme_cls(layer_type, prefix)[2].__name__
        _write(record)


def _observe_config(cls) -> None:
    """Record what ``cls.get_quant_method`` decides per prefix (a ``target`` record), the method class included when
    its constructor raises; keep the live config and a layer of each class for :func:`_decide_rest`."""
    original = cls.get_quant_method

    def get_quant_method(self, layer, prefix):
        _live["config"] = self
        _live["targets"].add(prefix)
        _live["samples"].setdefault(type(layer).__name__, layer)
        record = {"kind": "target", "prefix": prefix, "weight_key": None, "activation_key": None}
        try:
            method = original(self, layer, prefix)
        except Exception as exc:
            _write({**record, "target": _method_in(exc)})
            raise
        _write({**record, "target": _name(method)})
        return method

    get_quant_method.__wrapped__ = original
    cls.get_quant_method = get_quant_method


def _observe_stage(cls, method: str, default_stage: str, ready: bool, decide_rest: bool = False) -> None:
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        try:
            result = original(self, *args, **kwargs)
        except Exception as exc:
            _write(_stopped(exc, default_stage))
            if decide_rest:
                try:
                    _decide_rest()
                except Exception as inner:  # never mask vLLM's own error
                    _write({"kind": "decide_failed", "error": f"{type(inner).__name__}: {inner}"[:800]})
            raise
        if ready:
            _write({"kind": "ready"})
        return result

    setattr(cls, method, wrapped)


def _reset() -> None:
    """Forget the previous checkpoint's config and layers (several checkpoints in one process: :func:`probe_many`)."""
    _live.update(config=None, layers={}, targets=set(), samples={})


def _register_kernel_overrides_once() -> None:
    """vLLM registers its platform's kernel overrides when a worker starts, once per worker process, by scanning
    every loaded module. Here every job's worker is this process: register them once, first, then skip it. Later,
    Kimi-K2.5's image preprocessor (vLLM's model config) loads numba, whose llvmlite objects that scan cannot read
    (vLLM 0.32: "'_lib_fn_wrapper' object has no attribute 'get'"); a server's worker never loads numba."""
    from vllm.platforms import current_platform

    platform = type(current_platform)
    current_platform.register_triton_kernel_overrides()
    platform.register_triton_kernel_overrides = classmethod(lambda cls: None)


def probe_many(jobs: list[dict]) -> None:
    """Build vLLM's engine for each job's checkpoint in turn, in this process, as ``vllm serve`` would from the
    job's ``argv`` (the server's own argument parser reads it), writing the job's ``records`` (``layers``: its
    REQUANT_VLLM_PROBE_LAYERS). Where start-up fails the hooks record where and why, and the next job goes on; a
    failure no hook saw (the arguments, the config) is a ``failed`` record. Each job ends with a ``done`` record."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    _register_kernel_overrides_once()
    os.environ[ENV] = jobs[0]["records"]
    register()
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.llm_engine import LLMEngine

    for job in jobs:
        os.environ[ENV] = job["records"]
        if job.get("layers"):
            os.environ[LAYERS_ENV] = job["layers"]
        else:
            os.environ.pop(LAYERS_ENV, None)
        _reset()
        argv = list(job["argv"])
        if "--distributed-executor-backend" not in argv:  # the worker in this process too
            argv += ["--distributed-executor-backend", "uni"]
        engine = None
        try:
            args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
            validate_parsed_serve_args(args)
            engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
        except BaseException as exc:  # argparse exits with SystemExit
            seen = os.path.exists(job["records"]) and any(
                json.loads(line)["kind"] == "stopped" for line in open(job["records"]) if line.strip())
            if not seen:
                _write({"kind": "failed", "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:4000]})
        finally:
            if engine is not None:
                engine.engine_core.shutdown()
            del engine
            cleanup_dist_env_and_memory()
        _write({"kind": "done"})


def register() -> None:
    """The plugin entry point; vLLM calls it in each of its processes. Does nothing without REQUANT_VLLM_PROBE."""
    global _installed
    if _installed or not os.environ.get(ENV):
        return
    _installed = True
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.quark.quark import QuarkConfig
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor

    _observe_layers(LinearBase, "prefix")
    _observe_layers(RoutedExperts, "layer_name")
    _observe_layers(VocabParallelEmbedding, "prefix")

    original_target = QuarkConfig.get_quant_method_target

    def get_quant_method_target(self, prefix, layer_type):
        weight_key, activation_key, method = original_target(self, prefix, layer_type)
        _live["config"] = self
        _live["targets"].add(prefix)
        _write({"kind": "target", "prefix": prefix, "target": None if method is None else method.__name__,
                "weight_key": None if weight_key is None else str(weight_key),
                "activation_key": None if activation_key is None else str(activation_key)})
        return weight_key, activation_key, method

    QuarkConfig.get_quant_method_target = get_quant_method_target
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.modelopt import ModelOptQuantConfigBase

    for config_cls in (CompressedTensorsConfig, ModelOptQuantConfigBase):
        _observe_config(config_cls)
    _observe_stage(BaseModelLoader, "load_model", "build_layers", ready=False, decide_rest=True)
    _observe_stage(Executor, "__init__", "build_layers", ready=False)
    _observe_stage(EngineCore, "_initialize_kv_caches", "profile", ready=True)


if __name__ == "__main__":
    import sys

    import requant_vllm_probe  # this file under the name vLLM's plugin loader imports it by: one set of hooks

    with open(sys.argv[1]) as f:
        requant_vllm_probe.probe_many(json.load(f))
