"""AMD Quark 0.11, the reference implementation of the target formats, as the tests (the oracle) and the
benchmark (the baseline) run it. amd-quark is an optional dependency (the ``oracle``/``test`` extras), imported
only when one of these functions runs.

* In process: :func:`quark_quantize_weight` runs the same per-tensor sequence as Quark's file-to-file exporter
  (observer -> ``scaled_real_quantize`` -> pack -> E8M0 scale).
* As a script: ``python -m requant.testing.quark_reference SRC JOBS_JSON`` runs Quark's own
  ``quantize_model_per_safetensor`` for each ``{"dst", "scheme", "exclude", "layer_config"}`` of the JSON list. A separate
  process, because that function sets torch's global default dtype from config.json.
  A job ``{"nvfp4_weights": FILE, "dst": OUT}`` runs Quark 0.13's two-stage NVFP4 weight quantizer on every tensor
  of one safetensors file instead (:func:`quark_nvfp4_weights`).
"""

from __future__ import annotations

import json
import sys
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from requant.recipe import QuarkEquivalent

TEMPLATE = "kimi_k25"  # Quark's LLMTemplate for the Kimi K2.5/K2.6 family


def quark_equivalents() -> dict[str, QuarkEquivalent]:
    """Every built-in Quark export's Quark equivalent, by name: what its file states as ``quark_equivalent`` (the scheme,
    the exclude patterns as AMD writes them and the layer_config a Quark user passes for the same output),
    independent of requant's own class table."""
    from requant.errors import RequantError
    from requant.export import ExportFormat
    from requant.recipe import builtin_names, load_checks, load_recipe

    out = {}
    for name in builtin_names():
        if load_recipe(name).export != ExportFormat.QUARK:
            continue
        quark = load_checks(name).quark
        if quark is None:
            raise RequantError(f"recipe builtin:{name} states no quark_equivalent; every built-in recipe needs one "
                               "(docs/recipes.md, Writing your own)")
        out[name] = quark
    return out


def _config(scheme: str, exclude: list[str] | None = None, layer_config: dict[str, str] | None = None):
    from quark.torch.quantization.config.template import LLMTemplate

    template = LLMTemplate.get(TEMPLATE)
    kwargs: dict[str, Any] = {"scheme": scheme}
    if exclude is not None:
        kwargs["exclude_layers"] = exclude
    if layer_config:
        kwargs["layer_config"] = layer_config
    return template.get_config(**kwargs)


@cache
def _weight_spec(scheme: str):
    return _config(scheme).global_quant_config.weight


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


def quark_quantize_nvfp4_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight bytes, weight_scale, weight_scale_2) of the template's ``nvfp4`` scheme, by the function Quark 0.13's
    file-to-file export calls for a two-stage scale-quant weight (``_scale_quantize_weight``), on the CPU."""
    from quark.torch.quantization import file2file_quantization as f2f

    out: dict[str, torch.Tensor] = {}
    f2f._scale_quantize_weight(weight, "m.weight", "m", _weight_spec("nvfp4"), out, "model.safetensors", "cpu")
    return out["m.weight"], out["m.weight_scale"], out["m.weight_scale_2"]


def quark_available() -> bool:
    try:
        import quark  # noqa: F401
    except ImportError:
        return False
    return True


def quark_config_dict(scheme: str, exclude: list[str], layer_config: dict[str, str] | None = None) -> dict[str, Any]:
    """The quantization config Quark itself builds for ``scheme``, ``exclude`` and ``layer_config``, as a dict."""
    return _config(scheme, exclude, layer_config).to_dict()


def quark_file2file(src: str, jobs: list[dict[str, Any]]) -> None:
    """Quark's own file-to-file export of ``src`` (or a job's own ``"src"``) for each ``{"dst", "scheme", "exclude",
    "layer_config"}``, or its NVFP4 weights of a file for each ``{"nvfp4_weights", "dst"}`` (run in a process of its
    own: see the module docstring). The same call works for Quark 0.11 and 0.13 (NVFP4: 0.13)."""
    from quark.torch.quantization.file2file_quantization import quantize_model_per_safetensor

    for job in jobs:
        if "nvfp4_weights" in job:
            quark_nvfp4_weights(job["nvfp4_weights"], job["dst"])
            continue
        config = _config(job["scheme"], job["exclude"], job.get("layer_config"))
        quantize_model_per_safetensor(job.get("src", src), config, job["dst"], device="cpu")


def file2file_command(src: str, jobs: list[dict[str, Any]]) -> list[str]:
    """The command line that runs :func:`quark_file2file` in a fresh Python process."""
    return [sys.executable, "-m", "requant.testing.quark_reference", src, json.dumps(jobs)]


def quark_nvfp4_weights(src: str, dst: str) -> None:
    """Every tensor of the safetensors file ``src`` through :func:`quark_quantize_nvfp4_weight`, into ``dst`` as
    ``NAME.weight``, ``NAME.weight_scale`` and ``NAME.weight_scale_2``."""
    from safetensors.torch import load_file, save_file

    out = {}
    for name, weight in load_file(src).items():
        packed, scale, scale_2 = quark_quantize_nvfp4_weight(weight)
        out.update({f"{name}.weight": packed.contiguous(), f"{name}.weight_scale": scale.contiguous(),
                    f"{name}.weight_scale_2": scale_2.contiguous()})
    save_file(out, dst)


if __name__ == "__main__":
    quark_file2file(sys.argv[1], json.loads(sys.argv[2]))
