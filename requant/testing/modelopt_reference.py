"""NVIDIA Model Optimizer 0.47, the reference implementation of the ``modelopt`` export, as the tests (the oracle) run
it: ``python -m requant.testing.modelopt_reference SRC JOBS_JSON`` in the peers' pinned virtualenv (.venv-llmc,
``make llmc-venv``) writes, for each ``{"dst", "scheme", "enable"}`` of the JSON list (with ``"src"``: of another
upstream; ``"threads"``: torch's thread count, default 1), what Model Optimizer's ``mtq.quantize`` and unified
Hugging Face export make of the upstream's weights, on the CPU; a ``{"dst", "summarize"}`` job writes Model
Optimizer's ``exclude_modules`` summary of name sets.

Model Optimizer quantizes a PyTorch model. The checkpoint's Kimi-K2.6 model is remote code (never run), so this
builds the module tree its tensors name (``nn.Linear`` for every matrix but the embedding, ``nn.Embedding`` for it,
plain modules holding the rest) with the upstream's weights: an upstream with a compressed-tensors
``quantization_config`` (Kimi's INT4) decoded by compressed-tensors' own dequantizer to BF16, as a Model Optimizer
user loading it with transformers gets it; a Model Optimizer NVFP4 upstream decoded by Model Optimizer's own
``NVFP4QTensor``; a BF16 upstream as it is. A job without ``scheme`` writes that decode alone. Then Model Optimizer's own code does the rest:

1. ``mtq.quantize`` with ``quant_cfg`` = its ``base_disable_all`` unit, its NVFP4 weight quantizer for each pattern
   of ``enable``, its ``default_disabled_quantizers`` unit (as its ``nvfp4_experts_only`` recipes compose them),
   ``algorithm: max``, no forward loop (weights calibrated, nothing else);
2. ``preprocess_linear_fusion`` on each set of modules that read the same input, which its export finds with a
   forward pass over the real model (``requantize_resmooth_fused_llm_layers``); DeepSeek-V3's are named here: an
   expert's or the shared experts' or the dense MLP's gate_proj + up_proj, MLA's q_a_proj + kv_a_proj_with_mqa;
3. ``_export_quantized_weight`` on every quantized module, ``get_quant_config`` on the tree, and
   ``_write_hf_export_config`` (hf_quant_config.json, and its form in config.json).

The output: ``model.safetensors`` (every tensor), ``config.json`` (the upstream's without its quantization configs,
plus Model Optimizer's), ``hf_quant_config.json``. Nothing of requant is imported in that process but this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The modules of DeepSeek-V3's decoder that read the same input, by their last name under one parent (Model
# Optimizer gives each such set one amax)
SAME_INPUT = ({"gate_proj", "up_proj"}, {"q_a_proj", "kv_a_proj_with_mqa"})


def _without_quantization_configs(config: Any) -> Any:
    if isinstance(config, dict):
        return {k: _without_quantization_configs(v) for k, v in config.items() if k != "quantization_config"}
    return config


def _load(src: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    config = json.loads((src / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "modelopt":
        return _modelopt_decode(tensors)
    if any("quantization_config" in part for part in (config, config.get("text_config") or {})):
        from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer

        tensors = CompressedTensorsDequantizer(str(src)).process(tensors)
    return tensors


def _modelopt_decode(tensors: dict[str, Any]) -> dict[str, Any]:
    """A Model Optimizer NVFP4 upstream's weights through its own ``NVFP4QTensor.dequantize`` to BF16 (what a user
    re-quantizing its BF16 form starts from); its scales and activation scales dropped."""
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    out = {}
    for name, tensor in tensors.items():
        module, _, param = name.rpartition(".")
        if f"{module}.weight_scale_2" not in tensors:
            out[name] = tensor
        elif param == "weight":
            shape = (tensor.shape[0], tensor.shape[1] * 2)
            out[name] = NVFP4QTensor(torch.Size(shape), torch.bfloat16, tensor).dequantize(
                torch.bfloat16, scale=tensors[f"{module}.weight_scale"], double_scale=tensors[f"{module}.weight_scale_2"],
                block_sizes={-1: 16})
    return out


def _tree(tensors: dict[str, Any]):
    """The module tree the tensor names describe, holding the tensors (as parameters)."""
    import torch
    from torch import nn

    root = nn.Module()
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        module, _, param = name.rpartition(".")
        by_module.setdefault(module, {})[param] = tensor
    for module, params in sorted(by_module.items()):
        weight = params.get("weight")
        leaf = module.rpartition(".")[2]
        if weight is not None and weight.dim() == 2 and "embed" in leaf:
            node = nn.Embedding(*weight.shape, dtype=weight.dtype)
        elif weight is not None and weight.dim() == 2 and not leaf.endswith("norm"):
            node = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in params, dtype=weight.dtype)
        else:
            node = nn.Module()
        for param, tensor in params.items():
            if param in dict(node.named_parameters(recurse=False)):
                getattr(node, param).data = tensor
            else:
                node.register_parameter(param, nn.Parameter(tensor, requires_grad=False))
        _place(root, module, node)
    return root


def _place(root, path: str, node) -> None:
    from torch import nn

    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    if hasattr(parent, parts[-1]):  # a container created before its own tensors: keep its children
        for name, child in getattr(parent, parts[-1]).named_children():
            node.add_module(name, child)
    parent.add_module(parts[-1], node)


def run_job(src: Path, tensors: dict[str, Any], job: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    dst = Path(job["dst"])
    if job.get("scheme") is None:
        dst.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export.quant_utils import get_quant_config, preprocess_linear_fusion
    from modelopt.torch.export.unified_export_hf import _export_quantized_weight, _write_hf_export_config
    from modelopt.torch.quantization.config import (
        _base_disable_all,
        _default_disabled_quantizer_cfg,
        _nvfp4_cfg,
    )

    if job["scheme"] != "W4A16_NVFP4":
        raise ValueError(f"scheme {job['scheme']!r}: this oracle runs W4A16_NVFP4")
    model = _tree({k: v.clone() for k, v in tensors.items()})
    quant_cfg = [*_base_disable_all, *({"quantizer_name": p, "cfg": _nvfp4_cfg} for p in job["enable"]),
                 *_default_disabled_quantizer_cfg]
    mtq.quantize(model, {"quant_cfg": quant_cfg, "algorithm": "max"}, forward_loop=None)
    modules = dict(model.named_modules())
    quantized = [name for name, m in modules.items()
                 if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)]
    sets: dict[tuple[str, int], list[str]] = {}
    for name in quantized:
        parent, _, leaf = name.rpartition(".")
        for i, names in enumerate(SAME_INPUT):
            if leaf in names:
                sets.setdefault((parent, i), []).append(name)
    for members in sets.values():
        if len(members) > 1:
            preprocess_linear_fusion([modules[n] for n in members])
    with torch.inference_mode():
        for name in quantized:
            _export_quantized_weight(modules[name], torch.bfloat16)
    hf_quant_config = get_quant_config(model)
    dst.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if "_quantizer" not in name:
            state[name] = tensor.detach().contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = _without_quantization_configs(json.loads((src / "config.json").read_text()))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _write_hf_export_config(model, hf_quant_config, dst)


def summarize(job: dict[str, Any]) -> None:
    """Model Optimizer's own ``exclude_modules`` summary of each ``{"unquantized", "quantized"}`` name set of
    ``job["summarize"]`` (a JSON file), written to ``job["dst"]`` as a JSON list of sorted lists."""
    from modelopt.torch.export.quant_utils import _prefix_wildcard_summarize_exclude_modules

    cases = json.loads(Path(job["summarize"]).read_text())
    Path(job["dst"]).write_text(json.dumps(
        [sorted(_prefix_wildcard_summarize_exclude_modules(c["unquantized"], c["quantized"])) for c in cases]))


def run_jobs(src: str, jobs: list[dict[str, Any]]) -> None:
    """Every job in one process (Model Optimizer takes seconds to import): a job's own ``"src"`` or ``src``, each
    upstream read once."""
    import torch

    loaded: dict[str, dict[str, Any]] = {}
    for job in jobs:
        torch.set_num_threads(job.get("threads", 1))  # the tests: one; requant bench peers: every core
        if "summarize" in job:
            summarize(job)
            continue
        job_src = job.get("src", src)
        if job_src not in loaded:
            loaded[job_src] = _load(Path(job_src))
        run_job(Path(job_src), loaded[job_src], job)


if __name__ == "__main__":
    run_jobs(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))
