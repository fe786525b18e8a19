"""NVFP4 (E2M1 elements two per byte, an FP8 E4M3 scale per 16 inputs, an FP32 global scale per tensor) as two makers
write it. compressed-tensors 0.19 writes it for llm-compressor 0.14's ``NVFP4A16`` (``nvfp4-pack-quantized``: ``weight_packed``,
``weight_scale``, ``weight_global_scale``), on the CPU path, step for step:

1. global scale ``g = 448 * 6 / amax`` in the weight's dtype, where ``amax`` is the largest magnitude of the tensor, or
   of every tensor that shares it (torch evaluates ``c / t`` as ``c * (1 / t)``: two roundings), and 1 where that
   is not finite (an all-zero tensor);
2. group scale ``s = fp8(clamp(g * (amax16 / 6), +-448))`` (``amax16 / 6`` in the weight's dtype, the product in
   FP32), 0.125 where it is zero;
3. elements ``e2m1(w / (s / g))`` in FP32, round half to even, saturated at 6; a negative weight that rounds to zero
   keeps its sign (code 0x8) unless the quotient underflows.

The stored global scale is the divisor: a weight decodes as ``e2m1 * (s / g)``.

NVIDIA Model Optimizer 0.47 (``W4A16_NVFP4``: ``weight``, ``weight_scale``, ``weight_scale_2``) stores the
reciprocal, the multiplier, and computes in FP32 from the BF16 weight (``NVFP4QTensor`` without TensorRT-LLM):

1. ``weight_scale_2 = amax / 2688`` (FP32, a 0-dim tensor), ``amax`` as above;
2. group scale ``s = fp8(clamp(amax16 / (6 * weight_scale_2), 2**-9, 448))``, 1 where ``amax16 / ...`` is zero;
3. elements ``e2m1(w / (s * weight_scale_2))``, rounding as above; a weight decodes as ``e2m1 * s * weight_scale_2``.

One deliberate difference: where ``amax`` is zero (tensors that are zero throughout) Model Optimizer divides zero by
zero and writes NaN group scales and code 7 (6.0) for every element; requant takes ``weight_scale_2 = 1`` there and
writes zeros with group scales of 1.
"""

from __future__ import annotations

import torch

from requant.constants import E2M1_MAX, E2M1_SIGN_BIT, FP8_E4M3_MAX
from requant.formats.mxfp4 import dequantize_e2m1, e2m1_codes, pack_fp4

NVFP4_GROUP = 16  # elements sharing one FP8 scale, along the input dimension
FP8_EPS = 0.125   # the group scale written for an all-zero group (compressed-tensors' eps for FP8)
FP8_MIN_SCALE = 2.0 ** -9  # Model Optimizer's smallest group scale (the smallest E4M3 subnormal)


def tensor_amax(weight: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of ``weight``, in its dtype (a scalar)."""
    return weight.abs().amax()


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The FP32 ``weight_global_scale`` [1] for the largest magnitude ``amax`` (a scalar in the weights' dtype) of
    the tensors that share it."""
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    scale = amax.reciprocal() * (FP8_E4M3_MAX * E2M1_MAX)
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def quantize_nvfp4(weight: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in] (in % 16 == 0) -> (packed uint8 [out, in/2], FP8 E4M3 scales [out, in/16], FP32 global
    scale [1]); ``amax``: the largest magnitude of the tensors sharing the global scale (default: ``weight``'s)."""
    _check_matrix(weight)
    g = global_scale(tensor_amax(weight) if amax is None else amax.to(weight.dtype))
    groups = weight.reshape(weight.shape[0], -1, NVFP4_GROUP)
    amax16 = groups.abs().amax(dim=-1)
    scale = g * (amax16 / torch.tensor(E2M1_MAX, dtype=weight.dtype))
    scale = scale.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    scale = torch.where(scale == 0, torch.tensor(FP8_EPS), scale)
    packed = _signed_e2m1(groups.to(torch.float32) / (scale / g).unsqueeze(-1), weight.shape)
    return packed, scale.to(torch.float8_e4m3fn), g


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale_: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed uint8 [out, in/2], FP8 scales [out, in/16], FP32 global scale [1]) -> values [out, in], as
    compressed-tensors decodes them: ``e2m1 * (s / g)`` in FP32."""
    return _scaled(dequantize_e2m1(packed), scale.to(torch.float32) / global_scale_.to(torch.float32), dtype)


def _signed_e2m1(quotient: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Quotients [out, in/16, 16] -> packed codes [out, in/2]; a negative quotient that rounds to zero keeps its
    sign (code 0x8), as both makers write it."""
    codes = e2m1_codes(quotient)
    codes |= ((codes == 0) & (quotient < 0)).to(torch.uint8) * E2M1_SIGN_BIT
    return pack_fp4(codes.reshape(shape))


def _scaled(values: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E2M1 values [out, in] times their group's step [out, in/16], in FP32, then ``dtype``."""
    groups = values.reshape(values.shape[0], -1, NVFP4_GROUP)
    return (groups * step.unsqueeze(-1)).reshape(values.shape).to(dtype)


def _check_matrix(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.shape[-1] % NVFP4_GROUP:
        raise ValueError(f"NVFP4 needs a matrix whose input dimension is a multiple of {NVFP4_GROUP}, "
                         f"got {tuple(weight.shape)}")


def weight_scale_2(amax: torch.Tensor) -> torch.Tensor:
    """Model Optimizer's FP32 ``weight_scale_2`` (0-dim) for the largest magnitude ``amax`` of the tensors sharing
    it: ``amax / 2688``, 1 where ``amax`` is zero."""
    amax = amax.to(torch.float32).reshape(())
    return torch.where(amax == 0, torch.ones(()), amax / (E2M1_MAX * FP8_E4M3_MAX))


def quantize_nvfp4_modelopt(weight: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """weight [out, in] (in % 16 == 0) -> (packed uint8 [out, in/2], FP8 E4M3 scales [out, in/16], FP32
    ``weight_scale_2`` []), as Model Optimizer 0.47 exports ``W4A16_NVFP4``; ``amax``: the largest magnitude of the
    tensors sharing ``weight_scale_2`` (default: ``weight``'s)."""
    _check_matrix(weight)
    scale_2 = weight_scale_2(tensor_amax(weight) if amax is None else amax)
    groups = weight.reshape(weight.shape[0], -1, NVFP4_GROUP)
    scale = groups.abs().amax(dim=-1).to(torch.float32) / (E2M1_MAX * scale_2)
    scale = torch.where(scale == 0, torch.ones(()), scale).clamp(FP8_MIN_SCALE, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    packed = _signed_e2m1(groups / (scale.to(torch.float32) * scale_2).unsqueeze(-1), weight.shape)
    return packed, scale, scale_2


def dequantize_nvfp4_modelopt(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed uint8 [out, in/2], FP8 scales [out, in/16], FP32 ``weight_scale_2``) -> values [out, in], as Model
    Optimizer decodes them: ``e2m1 * (s * weight_scale_2)`` in FP32, code 0x8 as +0 (its table has no -0)."""
    values = dequantize_e2m1(packed) + 0.0  # -0 + 0 is +0
    return _scaled(values, scale.to(torch.float32) * scale_2.to(torch.float32).reshape(()), dtype)


def quantize_nvfp4_quark(weight: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """weight [out, in] (in % 16 == 0) -> (packed uint8 [out, in/2], FP8 E4M3 scales [out, in/16], FP32
    ``weight_scale_2`` []), as AMD Quark 0.13's file-to-file export writes its two-stage NVFP4 weight
    (``FP4Block16ScaleE4M3``: FP4 per 16 with an FP32 scale, that scale quantized to FP8 per tensor); ``amax``: the
    largest magnitude of the tensors sharing ``weight_scale_2`` (default: ``weight``'s), all in FP32:

    1. ``weight_scale_2 = amax / 2688``, FP32's epsilon where that is zero;
    2. block scale ``b = amax16 / 6``, epsilon where zero; stored ``fp8(clamp(b / weight_scale_2, +-448))``;
    3. elements ``e2m1(w / (s * weight_scale_2))`` with ``s`` the stored scale's value (epsilon in place of a product
       that is zero), round half to even, saturated at 6; a negative weight that rounds to zero is +0, as in Quark's
       MXFP4 (not Model Optimizer's code 0x8)."""
    _check_matrix(weight)
    eps = torch.finfo(torch.float32).eps
    amax = (tensor_amax(weight) if amax is None else amax).to(torch.float32).reshape(())
    scale_2 = amax / (E2M1_MAX * FP8_E4M3_MAX)
    scale_2 = torch.where(scale_2 == 0, torch.tensor(eps), scale_2)
    groups = weight.reshape(weight.shape[0], -1, NVFP4_GROUP).to(torch.float32)
    block = groups.abs().amax(dim=-1) / E2M1_MAX
    block = torch.where(block == 0, torch.tensor(eps), block)
    step = (block / scale_2).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale_2
    stored = (step / scale_2).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    step = torch.where(step == 0, torch.tensor(eps), step)
    packed = pack_fp4(e2m1_codes(groups / step.unsqueeze(-1)).reshape(weight.shape))
    return packed, stored, scale_2
