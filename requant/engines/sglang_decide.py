"""What SGLang decides for each layer of checkpoints: the quantization method its own model classes pick.

This file runs in SGLang's environment (``.venv-sglang``, ``make sglang-venv``), not requant's: it imports only the
standard library, torch, safetensors and SGLang. ``requant.engines.sglang.decide`` runs it and reads its JSON.

    python sglang_decide.py --out DECISIONS.json [--capability 9.5] [--load] CHECKPOINT [CHECKPOINT ...]

No matching logic is re-implemented. For each checkpoint it makes the calls ``sglang serve`` makes before it reads a
tensor: ``ModelConfig`` (the quantization method from config.json), ``get_model_architecture``, the loader's
``_get_quantization_config`` (the model's packed-modules mapping, ``QuarkConfig.from_config`` or
``CompressedTensorsConfig``, the model's weight-name mapper) and ``_initialize_model``, which builds SGLang's real
model (Kimi-K2.5/K2.6 -> DeepseekV3), each layer asking the config for its method in its own constructor. Then it
reads ``quant_method`` (and the Quark scheme) off every layer. Calling the config class alone gives other answers:
the model replaces the packed-modules mapping while it is built. With ``--load`` the model is built on the CPU
(not the meta device) and the checkpoint's tensors are fed to its own ``load_weights`` (SGLang's weight loaders,
which refuse a tensor whose dtype or shape does not fit the layer it chose); kernels are not prepared, but for
NVFP4 MoE layers (one global scale per gate/up projection), whose ``process_weights_after_loading`` is run to see
what it makes of the two scales (it keeps one; SGLang's weight-only method refuses experts whose two differ).

SGLang serves on GPUs; on a CPU its model classes need these stand-ins, none of which is read by the decision
(each is listed in the output):
1. ``torchvision`` is an import shim: PyPI's wheels are CUDA builds that do not import with CPU torch, and SGLang
   imports it only for InternVL image preprocessing. Calling anything in it raises.
2. ``rotary_embedding.base._is_cpu = True``: off CUDA/HIP, RotaryEmbedding imports vLLM's custom ops for a
   fallback kernel; the flag picks its torch path.
3. The device capability QuarkConfig (and CompressedTensorsConfig) checks schemes against is ``--capability``
   (9.5 = MI355X; on a CPU SGLang gets (None, None) and its check raises); from 10.0 (B200) SGLang's own
   ``override_platform`` also says the machine is a CUDA Blackwell, which its NVFP4 MoE methods require.
4. SGLang's own test hook publishes default ServerArgs (device cpu), and a one-process gloo group stands for a
   ``--tp 1`` server, the per-process ranks nothing writes without the launcher stamped 0.
5. Where ``vision_config`` lacks ``vt_hidden_size``/``text_hidden_size`` (SGLang's K2VL projector reads them) they
   are filled from the hidden sizes in a temporary copy of the JSON files; the projector gets no quant config.
6. ``trust_remote_code=False``: SGLang's built-in KimiK25Config, never the checkpoint's code.
"""

from __future__ import annotations

import argparse
import glob
import importlib.abc
import importlib.machinery
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import types
import warnings


class _Placeholder:
    """A torchvision attribute: fine to import and subclass, an error to call."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is an import shim here (requant's SGLang decider)")

    def __mro_entries__(self, bases):
        return (object,)


class _ShimModule(types.ModuleType):
    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self.__name__}.{item}")


class _TorchvisionShim(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _ShimModule(spec.name)
        module.__path__ = []
        module.__version__ = "0+requant.shim"  # transformers parses it; lower than any release it asks for
        return module

    def exec_module(self, module):
        pass


def _shim_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401  a working torchvision wins
        return False
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionShim())
        return True


def _config_copy(checkpoint: str) -> tuple[str, list[str]]:
    """The checkpoint's JSON files in a temporary folder, the two vision fields filled where missing."""
    folder = tempfile.mkdtemp(prefix="requant-sglang-")
    for path in glob.glob(os.path.join(checkpoint, "*.json")):
        shutil.copy(path, folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    filled = []
    vision, text = config.get("vision_config"), config.get("text_config") or {}
    if isinstance(vision, dict):
        for key, value in (("vt_hidden_size", vision.get("hidden_size")), ("text_hidden_size", text.get("hidden_size"))):
            if key not in vision and value is not None:
                vision[key] = value
                filled.append(f"vision_config.{key}={value}")
    with open(path, "w") as f:
        json.dump(config, f)
    return folder, filled


def _where(exc: BaseException, root: str) -> list[str]:
    """The innermost three of SGLang's own frames (file under sglang/, line, function)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root + os.sep)]
    return [f"{os.path.relpath(f.filename, root)}:{f.lineno} {f.name}" for f in frames[-3:]]


def _error(exc: BaseException, root: str) -> dict:
    return {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:1000], "where": _where(exc, root)}


class Decider:
    """SGLang's loader state for a one-GPU server, set up once, then a model built per checkpoint."""

    def __init__(self, capability: tuple[int, int]):
        self.stand_ins = ["torchvision import shim"] if _shim_torchvision() else []
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        import sglang
        import sglang.srt.layers.quantization.quark.quark as quark
        import sglang.srt.layers.rotary_embedding.base as rotary
        import torch
        from sglang.srt.distributed import parallel_state
        from sglang.srt.layers.dp_attention import initialize_dp_attention
        from sglang.srt.runtime_context import get_context, get_parallel

        self.sglang, self.torch = sglang, torch
        self.root = os.path.dirname(sglang.__file__)
        rotary._is_cpu = True
        quark.get_device_capability = lambda device_id=0: capability
        torch.cuda.get_device_capability = lambda device=None: capability  # CompressedTensorsConfig asks torch
        if capability >= (10, 0):  # an NVIDIA Blackwell GPU (B200/GB200: 10.0): SGLang's own platform override
            from sglang.srt.runtime_context import override_platform

            override_platform(is_cuda=True, is_blackwell=True, is_sm100=True, device_capability=capability).install()
            self.stand_ins.append("platform: Blackwell (SGLang's override_platform)")
        self.stand_ins += ["rotary_embedding _is_cpu", f"device capability {capability[0]}.{capability[1]}",
                           "ServerArgs(device=cpu) + one-process gloo group, ranks 0", "trust_remote_code=False"]
        server_args = get_context().override_server_args(device="cpu").install()
        parallel = get_parallel()
        parallel.override_permanently(tp_rank=0, pp_rank=0)
        port = 20000 + os.getpid() % 20000
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                    distributed_init_method=f"tcp://127.0.0.1:{port}")
        parallel_state.initialize_model_parallel(backend="gloo")
        initialize_dp_attention(server_args=server_args)
        unwritten = {}
        for name in ("moe_ep_rank", "moe_dp_rank", "moe_tp_rank", "attn_tp_rank", "attn_cp_rank", "dcp_rank",
                     "attn_dcp_rank", "attn_dp_rank", "dp_rank"):
            try:
                getattr(parallel, name)
            except RuntimeError:
                unwritten[name] = 0
        parallel.override_permanently(**unwritten)

    def decide(self, checkpoint: str, load: bool) -> dict:
        """The main model's decisions; for a checkpoint with MTP layers (``num_nextn_predict_layers``) also the
        draft model's, as ``--speculative-algorithm NEXTN`` builds it from the same checkpoint (``draft``)."""
        result = self._decide(checkpoint, load, draft=False)
        with open(os.path.join(checkpoint, "config.json")) as f:
            config = json.load(f)
        text = config.get("text_config") or config
        if text.get("num_nextn_predict_layers"):
            result["draft"] = self._decide(checkpoint, load, draft=True)
        return result

    def _decide(self, checkpoint: str, load: bool, draft: bool) -> dict:
        from sglang.srt.configs.load_config import LoadConfig
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.model_loader import loader
        from sglang.srt.model_loader.utils import get_model_architecture

        folder, filled = _config_copy(checkpoint)
        result: dict = {"checkpoint": checkpoint, "sglang": self.sglang.__version__,
                        "stand_ins": self.stand_ins + [f"filled {f}" for f in filled], "layers": [],
                        "build_error": None, "load": None}
        try:
            model_config = ModelConfig(folder, trust_remote_code=False, is_draft_model=draft)
            model_class, result["architecture"] = get_model_architecture(model_config)
            load_config = LoadConfig()
            quant_config = loader._get_quantization_config(model_config, load_config)
            result["quantization"] = model_config.quantization
            result["quant_config"] = type(quant_config).__name__ if quant_config is not None else None
            asked: dict[str, dict] = {}  # what each layer constructor was told, reported if a later one raises
            if quant_config is not None:
                real = quant_config.get_quant_method

                def recording(layer, prefix, *args, **kwargs):
                    method = real(layer, prefix, *args, **kwargs)
                    scheme = getattr(layer, "scheme", None) if method is not None else None
                    asked[prefix] = {"prefix": prefix, "layer_type": type(layer).__name__, "built": False,
                                     "quant_method": type(method).__name__ if method is not None else None,
                                     "scheme": type(scheme).__name__ if scheme is not None else None}
                    return method

                quant_config.get_quant_method = recording
            self.torch.set_default_dtype(model_config.dtype)
            model = None
            try:
                with self.torch.device("cpu" if load else "meta"):
                    model = loader._initialize_model(model_config, load_config, quant_config)
            except Exception as exc:  # the layers decided before the failure, as their constructors were told
                result["build_error"] = _error(exc, self.root)
                result["layers"] = [a for a in asked.values() if a["layer_type"] != "RadixAttention"]
            if model is not None:
                result["layers"] = self._layers(model)
                if load:
                    result["load"] = self._load(model, checkpoint)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return result

    def _layers(self, model) -> list[dict]:
        from sglang.srt.layers.linear import LinearBase
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
        from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

        layers = []
        for prefix, module in model.named_modules():
            kind = type(module).__name__
            if prefix.startswith(("vision_tower", "mm_projector")):
                continue
            if kind == "MoEGate":  # the router: a bare parameter that never asks the quant config
                layers.append({"prefix": prefix, "layer_type": kind, "quant_method": None, "scheme": None,
                               "weight_dtype": str(module.weight.dtype).removeprefix("torch.")})
            elif isinstance(module, (LinearBase, FusedMoE, VocabParallelEmbedding)):
                method, scheme = getattr(module, "quant_method", None), getattr(module, "scheme", None)
                layers.append({"prefix": prefix, "layer_type": kind,
                               "quant_method": type(method).__name__ if method is not None else None,
                               "scheme": type(scheme).__name__ if scheme is not None else None})
        return layers

    def _load(self, model, checkpoint: str) -> dict:
        from safetensors import safe_open

        def tensors():
            for shard in sorted(glob.glob(os.path.join(checkpoint, "*.safetensors"))):
                with safe_open(shard, "pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        try:
            model.load_weights(tensors())
        except Exception as exc:
            return {"ok": False, **_error(exc, self.root)}
        return {"ok": True, "global_scales": self._global_scales(model)}

    def _global_scales(self, model) -> list[dict]:
        """Each MoE layer whose fused gate+up weight has one global scale per projection (NVFP4: a [experts, 2]
        parameter as SGLang's loaders filled it): how many experts' gate and up scales differ, and what SGLang's
        own kernel preparation (``process_weights_after_loading``, which keeps one scale for both) makes of it:
        done, or its error (on a CPU, a missing GPU kernel after the scale check is the expected end)."""
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

        out = []
        for prefix, module in model.named_modules():
            if not isinstance(module, FusedMoE):
                continue
            for name in ("w13_weight_scale_2", "w13_weight_global_scale"):
                param = getattr(module, name, None)
                if param is None or param.dim() != 2 or param.shape[1] != 2:
                    continue
                differ = int((param[:, 0] != param[:, 1]).sum())
                record = {"prefix": prefix, "param": name, "experts": int(param.shape[0]), "gate_up_differ": differ}
                try:
                    module.quant_method.process_weights_after_loading(module)
                    record["prepare"] = {"ok": True}
                except Exception as exc:
                    record["prepare"] = {"ok": False, **_error(exc, self.root)}
                out.append(record)
                break
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True, help="write the decisions here (JSON, one entry per checkpoint)")
    parser.add_argument("--capability", default="9.5", help="device capability major.minor (9.5: MI355X)")
    parser.add_argument("--load", action="store_true", help="also feed every tensor to the model's load_weights")
    args = parser.parse_args(argv)
    major, minor = (int(x) for x in args.capability.split("."))
    decider = Decider((major, minor))
    results = [decider.decide(os.path.abspath(c), args.load) for c in args.checkpoints]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
