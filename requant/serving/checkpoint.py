"""Load any variant this project reads or writes for serving: dequantized weights plus activation specs.

Emulation the way vLLM's emulation path runs a quantized checkpoint on hardware without the kernels:
every quantized weight is dequantized once at load time (an upstream in any format requant reads, Quark MXFP4,
Quark per-channel FP8, or plain BF16), and the layers that the checkpoint's quantization config quantizes
with dynamic activations get a quantize-dequantize of their inputs at run time (``activation_qdq``).

Only the text model (``language_model.*`` in the Kimi VLM wrapper) is loaded; the vision tower and
projector are bypassed. Tensor bytes are parsed with the project's validated safetensors reader,
never unpickled.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from requant.errors import CheckpointError
from requant.formats.fp8 import dequantize_fp8_per_channel
from requant.formats.mxfp4 import dequantize_mxfp4
from requant.formats.source import MODULE_PARAMS, Source, decode_stored, detect_source, stored_as
from requant.io.safetensors import TORCH_TO_NAME, bytes_to_tensor, read_header
from requant.io.storage import open_storage
from requant.layout import load_config
from requant.manifest import CONFIG_FILE, INDEX_FILE, SINGLE_SHARD, read_weight_map
from requant.serving.activations import activation_qdq


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What the reference model needs: the text config, dequantized weights and per-module activation QDQ."""

    uri: str
    text_config: dict[str, Any]
    weights: dict[str, torch.Tensor]              # text-model names without the VLM prefix, e.g. "model.norm.weight"
    activation: dict[str, Callable | None]        # module name -> activation QDQ for quantized modules
    schemes: dict[str, str]  # module -> "bf16" | "mxfp4" | "fp8" (Quark's) | an upstream's format ("int4", "fp8-block", ...)
    storage: Any

    def scheme_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for scheme in self.schemes.values():
            counts[scheme] += 1
        return dict(sorted(counts.items()))


def load_checkpoint(uri: str, dtype: torch.dtype = torch.float32) -> LoadedCheckpoint:
    storage = open_storage(uri)
    if not storage.exists(CONFIG_FILE):
        raise CheckpointError(f"{uri}/{CONFIG_FILE}", "missing; not a checkpoint directory")
    cfg = load_config(storage.read_bytes(CONFIG_FILE), f"{uri}/{CONFIG_FILE}")
    quant = cfg.raw.get("quantization_config") or cfg.quantization
    raw = _read_text_tensors(storage, uri, cfg.prefix)
    source = detect_source(quant, f"{uri}/{CONFIG_FILE}") if (quant or {}).get("quant_method") != "quark" else None
    weights, schemes = _dequantize(raw, uri, dtype, source)
    specs = _activation_specs(quant, f"{uri}/{CONFIG_FILE}")
    activation = {m: (specs(cfg.prefix + m) if s in ("mxfp4", "fp8") else None) for m, s in schemes.items()}
    return LoadedCheckpoint(uri, cfg.text, weights, activation, schemes, storage)


def _activation_specs(quant: dict | None, where: str) -> Callable[[str], Callable | None]:
    """module name -> the QDQ function of its dynamic ``input_tensors`` spec (None: weight-only or unquantized),
    resolved the way Quark does: the first matching ``layer_quant_config`` pattern, else the global config."""
    if not quant or quant.get("quant_method") != "quark":
        return lambda module: None
    if quant.get("layer_type_quant_config"):
        raise CheckpointError(where, "Quark layer_type_quant_config is not supported by the reference server")
    layers = quant.get("layer_quant_config") or {}
    if not isinstance(layers, dict):
        raise CheckpointError(where, "quantization_config.layer_quant_config must be an object")
    qdq = {}
    for key, layer in [(None, quant.get("global_quant_config")), *layers.items()]:
        spec = (layer or {}).get("input_tensors") if isinstance(layer, dict) else None
        qdq[key] = activation_qdq(spec, where) if spec else None

    def lookup(module: str) -> Callable | None:
        return qdq[next((p for p in layers if fnmatch.fnmatch(module, p)), None)]

    return lookup


def _read_text_tensors(storage, uri: str, prefix: str) -> dict[str, tuple[torch.Tensor, str]]:
    """name (prefix stripped) -> (tensor, file) for every text-model tensor, one read per shard."""
    weight_map = read_weight_map(storage)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    elif storage.exists(SINGLE_SHARD):
        files = [SINGLE_SHARD]
    else:
        raise CheckpointError(uri, f"neither {INDEX_FILE} nor {SINGLE_SHARD} found")
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for file in files:
        entries, _ = read_header(storage, file)
        wanted = [e for e in entries.values() if e.name.startswith(prefix)
                  and not e.name[len(prefix):].startswith(("vision_tower.", "mm_projector."))]
        if not wanted:
            continue
        lo, hi = min(e.start for e in wanted), max(e.end for e in wanted)
        blob = storage.read_range(file, lo, hi)
        for e in wanted:
            tensors[e.name[len(prefix):]] = (bytes_to_tensor(blob[e.start - lo:e.end - lo], e), file)
    return tensors


def _dequantize(raw: dict[str, tuple[torch.Tensor, str]], uri: str, dtype: torch.dtype, source: Source | None):
    """Group tensors by module and turn each quantized module back into one ``weight`` in ``dtype``: an upstream's
    quantized modules (``source``: its declared format) through the format's reference decode, Quark's here."""
    weights: dict[str, torch.Tensor] = {}
    schemes: dict[str, str] = {}
    modules: dict[str, dict[str, tuple[torch.Tensor, str]]] = defaultdict(dict)
    for name, item in raw.items():
        module, _, leaf = name.rpartition(".")
        modules[module][leaf] = item
    for module, parts in modules.items():
        def where(leaf: str, parts=parts, module=module) -> str:
            return f"{uri}/{parts[leaf][1]}: {module}.{leaf}"

        kind = stored_as(set(parts), {leaf: TORCH_TO_NAME.get(t.dtype, "") for leaf, (t, _) in parts.items()})
        if kind != "dense":  # an upstream's quantized storage
            tensors = {leaf: parts[leaf][0] for leaf in MODULE_PARAMS[kind] if leaf in parts}
            if missing := [leaf for leaf in MODULE_PARAMS[kind] if leaf not in parts]:
                raise CheckpointError(where(next(iter(parts))), f"stored as {kind} without {', '.join(missing)}")
            if source is None or source.quantized_kind != kind:
                declared = source.format.value if source else "Quark's export"
                raise CheckpointError(where(next(iter(tensors))), f"stored as {kind}, but config.json declares {declared}")
            try:
                weights[f"{module}.weight"] = decode_stored(kind, tensors, source, dtype).to(dtype)
            except ValueError as e:
                raise CheckpointError(f"{uri}/{parts[next(iter(tensors))][1]}", str(e), module) from None
            schemes[module] = source.format.value
            continue
        for leaf, (tensor, _) in parts.items():
            if leaf == "weight" and tensor.dtype == torch.uint8:
                if "weight_scale" not in parts:
                    raise CheckpointError(where("weight"), "uint8 (MXFP4) weight without weight_scale")
                scale = parts["weight_scale"][0]
                if scale.dtype != torch.uint8 or scale.shape[-1] * 16 != tensor.shape[-1]:
                    raise CheckpointError(where("weight_scale"), f"expected uint8 E8M0 [*, {tensor.shape[-1] // 16}], "
                                                                 f"got {scale.dtype} {tuple(scale.shape)}")
                weights[f"{module}.weight"] = dequantize_mxfp4(tensor, scale, dtype)
                schemes[module] = "mxfp4"
            elif leaf == "weight" and tensor.dtype == torch.float8_e4m3fn:
                if "weight_scale" not in parts:
                    raise CheckpointError(where("weight"), "FP8 weight without weight_scale")
                scale = parts["weight_scale"][0].reshape(-1)
                if scale.numel() != tensor.shape[0]:
                    raise CheckpointError(where("weight_scale"), f"expected one scale per output channel ({tensor.shape[0]}), got {scale.numel()}")
                weights[f"{module}.weight"] = dequantize_fp8_per_channel(tensor, scale, dtype)
                schemes[module] = "fp8"
            elif leaf == "weight_scale" and "weight" in parts and parts["weight"][0].dtype in (torch.uint8, torch.float8_e4m3fn):
                continue
            elif tensor.is_floating_point():
                weights[f"{module}.{leaf}"] = tensor.to(dtype) if leaf != "e_score_correction_bias" else tensor.float()
                if leaf == "weight":
                    schemes.setdefault(module, "bf16")
            else:
                raise CheckpointError(where(leaf), f"unexpected {tensor.dtype} tensor for serving")
    return weights, schemes
