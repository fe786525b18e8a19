"""Run-time quantize-dequantize of layer inputs, from a Quark ``input_tensors`` spec (dynamic activations).

This is how an emulating engine runs an MXFP4 (or FP8) checkpoint without native kernels: the weights
are dequantized once, and each quantized layer's input is rounded onto the activation format on the
fly with the same scale rules the checkpoint's config names. Computation stays in FP32 here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from requant.constants import FP8_E4M3_MAX, MX_BLOCK_SIZE
from requant.errors import CheckpointError
from requant.formats.mxfp4 import fake_quantize_mxfp4


def mxfp4_qdq(x: torch.Tensor) -> torch.Tensor:
    """Per 32-element block along the last dim: Quark "even" E8M0 scale, E2M1 RNE elements, back to x.dtype.

    A block holding a NaN has a NaN scale (OCP MX reserves E8M0 0xFF for it), so all 32 of its values come
    back NaN, as Quark's FP32 quantizer and torchao's MX cast do; without this such a block silently became
    zeros. The weight encoder never sees a NaN (jobs refuse non-finite tensors), so only this path needs it.
    """
    out = fake_quantize_mxfp4(x)
    blocks = x.reshape(*x.shape[:-1], -1, MX_BLOCK_SIZE)
    out = out.reshape(blocks.shape).masked_fill(blocks.isnan().any(dim=-1, keepdim=True), float("nan"))
    return out.reshape(x.shape).to(x.dtype)


def fp8_per_token_qdq(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token (per-row) FP8 E4M3: scale = row amax / 448, values clamped and cast, then rescaled."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def activation_qdq(spec: dict, where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map a Quark input_tensors spec to its QDQ function; anything else is refused with a clear error."""
    dtype, qscheme = spec.get("dtype"), spec.get("qscheme")
    if not spec.get("is_dynamic", False):
        raise CheckpointError(where, f"static activation scales ({dtype}) are not supported by the reference server")
    if dtype == "fp4" and qscheme == "per_group" and spec.get("group_size") == MX_BLOCK_SIZE \
            and spec.get("scale_format") == "e8m0" and spec.get("scale_calculation_mode") in ("even", None):
        return mxfp4_qdq
    if dtype == "fp8_e4m3" and qscheme in ("per_channel", "per_token"):
        return fp8_per_token_qdq
    raise CheckpointError(where, f"unsupported input_tensors spec: dtype={dtype} qscheme={qscheme}")
