"""Adversarial checkpoints: the tiny ones with one layer's weights replaced by values where encoders part (scales
across the whole exponent range, zero and subnormal blocks, block maxima at rounding boundaries)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    nibbles = (q + 8).to(torch.int64).view(q.shape[0], -1, 8)
    words = (nibbles << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _adversarial_int4(shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and BF16 group scales where the two decodes part: scales across 2**-40..2**20, groups whose max |q| is
    3 or 5 with a scale mantissa at which the BF16 decode's block maximum rounds up to 1.75 * 2**n (the E8M0
    exponent then differs), all-zero groups (exponent -127), FP32-subnormal products, zero rows."""
    out, inp = shape
    groups = inp // 32
    q = torch.randint(-8, 8, (out, inp), generator=gen)
    scale = torch.exp2(torch.empty(out, groups).uniform_(-40, 20, generator=gen))
    kind = torch.randint(0, 10, (out, groups), generator=gen)
    for row, group in (kind <= 2).nonzero().tolist():  # max |q| 5 (mantissa 1+51/128) or 3 (1+21/128)
        qmax, mantissa = (5, 51) if kind[row, group] < 2 else (3, 21)
        block = torch.randint(-qmax, qmax + 1, (32,), generator=gen)
        block[int(torch.randint(0, 32, (1,), generator=gen))] = qmax
        q[row, group * 32:(group + 1) * 32] = block
        scale[row, group] = (1 + mantissa / 128) * 2.0 ** int(torch.randint(-30, 10, (1,), generator=gen))
    scale[kind == 3] = 0.0
    for row, group in (kind == 4).nonzero().tolist():
        q[row, group * 32:(group + 1) * 32] = 0
    scale[kind == 5] = 2.0 ** -130
    scale[0] = 0.0
    return _pack_int4(q), scale.to(torch.bfloat16)


def _adversarial_bf16(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Rows across 2**-30..2**30, a zero row, tiny and BF16-subnormal rows (row 2: amax below 2**-125, the rows
    Quark 0.13 turns into NaN as FP8), a huge row, and zero and subnormal 32-blocks."""
    w = torch.randn(shape, generator=gen) * torch.exp2(torch.empty(shape[0], 1).uniform_(-30, 30, generator=gen))
    w[0] = 0
    w[1] *= 2.0 ** -110
    w[2] = torch.randn(shape[1], generator=gen) * 2.0 ** -128
    w[3] = torch.randn(shape[1], generator=gen) * 1e30
    blocks = w.view(shape[0], -1, 32)
    pick = torch.rand(blocks.shape[:2], generator=gen)
    blocks[pick < 0.1] = 0
    blocks[(pick >= 0.1) & (pick < 0.2)] *= 2.0 ** -125
    return w.to(torch.bfloat16)


def adversarial_copy(upstream: Path, root: Path) -> Path:
    """A copy of ``upstream`` at ``root`` with layer 1's routed experts (INT4 or BF16), shared experts and attention
    (BF16) replaced by adversarial values of the same shapes."""
    shutil.copytree(upstream, root)
    gen = torch.Generator().manual_seed(1234)
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        changed = False
        for name in sorted(tensors):
            if ".layers.1." not in name:
                continue
            if ".mlp.experts." in name and name.endswith(".weight_packed"):
                module = name[: -len(".weight_packed")]
                shape = tuple(tensors[f"{module}.weight_shape"].tolist())
                tensors[name], tensors[f"{module}.weight_scale"] = _adversarial_int4(shape, gen)
                changed = True
            elif (".shared_experts." in name or ".self_attn." in name or ".mlp.experts." in name) \
                    and name.endswith("proj.weight") \
                    or name.endswith("kv_a_proj_with_mqa.weight"):
                tensors[name] = _adversarial_bf16(tuple(tensors[name].shape), gen)
                changed = True
        if changed:
            save_file(tensors, str(shard), metadata=metadata)
    return root


def adversarial_nvfp4(directory: Path, seed: int = 3) -> None:
    """Every NVFP4 weight of a synthetic upstream (compressed-tensors' or Model Optimizer's) rewritten in place:
    all-zero groups, FP8 scales at both ends (the smallest subnormal, 448), negative zeros beside every other code,
    global scales anywhere from 2**-20 to 2**20 (compressed-tensors' divisor, Model Optimizer's multiplier)."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name in [n for n in tensors if n.endswith((".weight_global_scale", ".weight_scale_2"))]:
            base, _, global_name = name.rpartition(".")
            packed_name = f"{base}.weight_packed" if global_name == "weight_global_scale" else f"{base}.weight"
            packed, scale = tensors[packed_name].clone(), tensors[f"{base}.weight_scale"].view(torch.uint8).clone()
            kind = torch.randint(0, 8, scale.shape, generator=gen)
            scale[kind == 0], scale[kind == 1] = 0x01, 0x7E
            negative_zeros = torch.randint(0, 4, packed.shape, generator=gen) == 0
            packed[negative_zeros] = (packed[negative_zeros] & 0xF0) | 0x08
            for r, g in (kind == 2).nonzero().tolist():
                packed[r, g * 8:(g + 1) * 8] = 0
            tensors[packed_name], tensors[f"{base}.weight_scale"] = packed, scale.view(torch.float8_e4m3fn)
            tensors[name] = torch.exp2(torch.empty(1).uniform_(-20, 20, generator=gen)).reshape(tensors[name].shape)
        save_file(tensors, str(shard), metadata={"format": "pt"})
