"""AMD Quark 0.11's per-tensor quantization, called the way its file-to-file exporter calls it.

The tests use it as the oracle for our encoders and the benchmark as the baseline; amd-quark is an
optional dependency (the ``oracle``/``test`` extras), imported only when this runs.
"""

from __future__ import annotations

from functools import cache

import torch

from requant.formats.table import WEIGHT_FORMATS

SCHEMES = tuple(fmt.quark_scheme for fmt in WEIGHT_FORMATS.values())


@cache
def _weight_spec(scheme: str):
    from quark.torch.quantization.config.template import LLMTemplate

    return LLMTemplate.get("kimi_k25").get_config(scheme=scheme).global_quant_config.weight


def quark_quantize_weight(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight bytes, weight_scale) exactly as Quark's file-to-file export stores them: observer ->
    ``scaled_real_quantize`` -> pack; MX scales converted to E8M0 bytes."""
    import quark
    from quark.torch.quantization.tensor_quantize import FakeQuantizeBase
    from quark.torch.utils.pack import create_pack_method

    spec = _weight_spec(scheme)
    quantizer = FakeQuantizeBase.get_fake_quantize(spec)
    quantizer.enable_observer()
    quantizer.disable_fake_quant()
    quantizer(weight)
    q = quark.torch.kernel.scaled_real_quantize(
        spec.dtype.value, weight, quantizer.scale, quantizer.zero_point, spec.ch_axis, spec.group_size,
        quantizer.quant_min, quantizer.quant_max, spec.round_method.value, spec.qscheme.value,
    )
    packed = create_pack_method(qscheme=spec.qscheme.value, dtype=spec.dtype.value).pack(q, False)
    scale = quantizer.scale
    if getattr(spec, "scale_format", None) == "e8m0":
        scale = (torch.log2(scale).round().to(torch.int16).clamp(-127, 127) + 127).to(torch.uint8)
    return packed, scale.contiguous()


def quark_available() -> bool:
    try:
        import quark  # noqa: F401
    except ImportError:
        return False
    return True
