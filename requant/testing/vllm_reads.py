"""What vLLM 0.32 decodes from a compressed-tensors NVFP4 checkpoint whose fused modules carry different global
scales, written as a checkpoint the reference server serves, so its cost can be measured (dev/measure_global_scales.py).

vLLM loads each routed expert's ``gate_proj`` and ``up_proj`` into one ``w13`` weight with one global scale: it keeps
column 0 (``w1``, the gate's) for both and logs "w1_weight_global_scale must match w3_weight_global_scale"
(``compressed_tensors_moe_w4a4_nvfp4.py``); so ``up_proj`` decodes as ``e2m1 * s_up / g_gate``. A fused linear layer
(the shared experts' and the dense MLP's ``gate_up_proj``, MLA's ``fused_qkv_a_proj``) takes the largest of its
parts' global scales for all of them (``compressed_tensors_w4a4_nvfp4.py``: "weight global scale is different for
parallel layers"). :func:`as_vllm_reads` rewrites the global scales that way; nothing else changes.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from requant.export.global_scales import EXPERT_W13, global_scale_group
from requant.manifest import MANIFEST_FILE

GLOBAL_SCALE = "weight_global_scale"


def vllm_global_scales(scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module: global scale}`` as vLLM applies them, over the sets the engines fuse
    (``requant.export.global_scales.global_scale_group``): an expert's up_proj takes its gate_proj's, a fused
    linear's parts the largest of theirs; every other module its own."""
    groups: dict[tuple[int, str], list[str]] = defaultdict(list)
    for module in scales:
        if (key := global_scale_group(module)) is not None:
            groups[key].append(module)
    out = dict(scales)
    for (kind, base), parts in groups.items():
        if kind == EXPERT_W13 and f"{base}.gate_proj" in scales:
            applied = scales[f"{base}.gate_proj"]  # w1's, for the whole w13
        else:
            applied = torch.stack([scales[p] for p in parts]).amax(dim=0)
        for p in parts:
            out[p] = applied
    return out


def as_vllm_reads(src: Path, dst: Path) -> Path:
    """A copy of the NVFP4 checkpoint ``src`` at ``dst`` with the global scales vLLM applies (no manifest: it is no
    longer requant's output)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST_FILE, ".requant", "eval"))
    shards = sorted(dst.glob("*.safetensors"))
    scales: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            scales |= {k.removesuffix(f".{GLOBAL_SCALE}"): f.get_tensor(k) for k in f.keys() if k.endswith(GLOBAL_SCALE)}
    applied = vllm_global_scales(scales)
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        changed = {k for k in tensors if k.endswith(GLOBAL_SCALE)
                   and not torch.equal(tensors[k], applied[k.removesuffix(f".{GLOBAL_SCALE}")])}
        for k in changed:
            tensors[k] = applied[k.removesuffix(f".{GLOBAL_SCALE}")].clone()
        if changed:
            save_file(tensors, str(shard), metadata=metadata)
    return dst
