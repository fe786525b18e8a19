"""Run-time activation quantize-dequantize (requant/serving/activations.py) against AMD Quark 0.11.2, bit for bit.

The oracle is Quark's own quantizer for the checkpoint's ``input_tensors`` spec: ``FakeQuantizeBase.get_fake_quantize``
on the spec of Quark's ``kimi_k25`` template, which is what Quark puts in front of every quantized Linear (a
``DynamicScaledFakeQuantize``). Ours is built the way the server builds it, from the ``quantization_config`` the
converter writes. Both are compared as raw bits (so -0.0 != +0.0); only NaN sign and payload are not compared.

* MXFP4 (``fp4``, per_group 32, E8M0 "even" scale): the same call on the same tensor.
* FP8 per-token (``fp8_e4m3``, per_channel, ``ch_axis`` 1): Quark's axis 1 is the token axis of its LLM activations
  ``[batch, tokens, hidden]``; vLLM reads this spec as dynamic per-token FP8 (``QuarkW8A8Fp8``), one scale per row of
  the flattened input, which is what the server does. Quark gets the rows as ``[1, rows, hidden]``.
* The reference server computes in FP32 only (``load_checkpoint`` dequantizes to FP32 and the model never casts
  down), which ``test_served_activations_equal_quark`` checks on the activations a real forward pass produces. BF16
  is compared for MXFP4 through Quark's observer path (its dynamic dispatcher sends BF16 to a CUDA-only kernel); FP8
  BF16 is not compared: Quark computes the scale and the division in BF16 there, vLLM in FP32, and the server never
  sees BF16.

Quark's quantizer is stateful (its observer buffers take the dtype of the last input, so an FP32 call after a BF16
one computes its amax in BF16): every call here gets a fresh one.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import requant
from requant.export.quark import quantization_config
from requant.recipe import load_recipe
from requant.serving.activations import activation_qdq
from requant.serving.checkpoint import load_checkpoint
from requant.serving.model import DeepseekV3Text

FORMATS = {"mxfp4": ("kimi-k2.6-mxfp4", "mxfp4"), "fp8": ("fp8-reference", "ptpc_fp8")}
E4M3_MAX = 448.0
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


@pytest.fixture(scope="module", autouse=True)
def quark_eager():
    """Quark's eager kernels. Its default torch.compile'd kernels gave the same bits on every input here (checked
    when this test was written) but cost about 40 s of compilation on a cold cache."""
    import quark.torch.quantization.tensor_quantize as tensor_quantize

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tensor_quantize, "QUARK_DISABLE_COMPILE", True)
        yield


@cache
def quark_spec(scheme: str):
    from quark.torch.quantization.config.template import LLMTemplate

    return LLMTemplate.get("kimi_k25").get_config(scheme=scheme).global_quant_config.input_tensors


def quark_qdq(fmt: str, x: torch.Tensor, observer_path: bool = False) -> torch.Tensor:
    from quark.torch.quantization.tensor_quantize import DynamicScaledFakeQuantize, FakeQuantizeBase

    quantizer = FakeQuantizeBase.get_fake_quantize(quark_spec(FORMATS[fmt][1]))
    assert isinstance(quantizer, DynamicScaledFakeQuantize)
    with torch.no_grad():
        if fmt == "fp8":
            return quantizer(x.reshape(1, -1, x.shape[-1])).reshape(x.shape)
        return quantizer.fake_quantize(x) if observer_path else quantizer(x)


@cache
def ours(fmt: str):
    """The QDQ function the server picks for the config the converter writes."""
    config = quantization_config(load_recipe(FORMATS[fmt][0]), [])
    return activation_qdq(config["global_quant_config"]["input_tensors"], f"{fmt} test config")


def assert_same_bits(mine: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor) -> None:
    assert mine.dtype == theirs.dtype == x.dtype and mine.shape == theirs.shape == x.shape
    same = (mine.view(INT_VIEW[x.dtype]) == theirs.view(INT_VIEW[x.dtype])) | (mine.isnan() & theirs.isnan())
    if not bool(same.all()):
        i = tuple(int(v) for v in (~same).nonzero()[0])
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} values differ; first at {i}: "
                             f"x={x[i].item()!r} ours={mine[i].item()!r} quark={theirs[i].item()!r}")


def _e2m1_midpoints() -> list[float]:
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    return [(a + b) / 2 for a, b in zip(grid, grid[1:])]          # 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5


def _e4m3_midpoints() -> torch.Tensor:
    values = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()   # all finite, >= 0
    return (values[:-1] + values[1:]) / 2                                                  # exact in FP32


def _rows(values: torch.Tensor, width: int, pin: float) -> torch.Tensor:
    """Rows of ``width`` whose first element ``pin`` fixes the scale (its amax), the rest taken from ``values``."""
    body = width - 1
    values = torch.cat([values, values.new_zeros(-len(values) % body)])
    rows = values.reshape(-1, body)
    return torch.cat([rows.new_full((len(rows), 1), pin), rows], dim=1)


def _mx_ties() -> torch.Tensor:
    """E2M1 midpoints of both signs in blocks whose amax 6 makes the scale 1, and the same scaled by 2**k."""
    mids = torch.tensor(_e2m1_midpoints())
    grid = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    block = torch.cat([torch.tensor([6.0, -6.0, -0.0, 0.0, 0.1, -0.1]), mids, -mids, grid, -grid])
    assert block.numel() == 32
    return torch.stack([block * 2.0 ** k for k in (0, -20, 20, -126, 100)]).repeat(1, 2)


def _fp8_ties() -> torch.Tensor:
    """Every E4M3 midpoint (normal and subnormal), both signs, in rows whose amax 448 makes the scale exactly 1."""
    mids = _e4m3_midpoints()
    return torch.cat([_rows(mids, 64, E4M3_MAX), _rows(-mids, 64, -E4M3_MAX)])


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    huge = randn(4, 64) * 3.0e38
    huge[0, 0] = torch.finfo(torch.float32).max
    huge[1, 5] = -torch.finfo(torch.float32).max
    mixed = randn(8, 64) * 10.0 ** torch.randint(-8, 8, (8, 64), generator=g).float()
    special = randn(4, 64)
    special[0, 3], special[1, 40] = float("nan"), float("inf")
    special[2, 7], special[3, 0] = -float("inf"), float("nan")
    return {
        "zeros": torch.zeros(3, 64),
        "negative zeros": -torch.zeros(3, 64),
        "one zero block": torch.cat([torch.zeros(2, 32), randn(2, 32)], dim=1),
        "negative values": -randn(4, 64).abs(),
        "E2M1 ties": _mx_ties(),
        "E4M3 ties": _fp8_ties(),
        "rows of different scales": randn(12, 64) * torch.logspace(-35, 35, 12).unsqueeze(1),
        "mixed magnitudes in a block": mixed,
        "huge": huge,
        "smallest normals and subnormals": torch.cat([randn(2, 64) * 1e-38, randn(2, 64) * 1e-42,
                                                      torch.arange(128.0).reshape(2, 64) * 1e-45]),
        "normal": randn(16, 256),
        "already BF16": randn(8, 128).bfloat16().float(),
        "3-D input": randn(2, 5, 64),
        "NaN and Inf": special,
    }


INPUTS = _inputs()


@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_qdq_equals_quark(fmt, name):
    x = INPUTS[name]
    assert_same_bits(ours(fmt)(x.clone()), quark_qdq(fmt, x.clone()), x)


@pytest.mark.parametrize("name", ["E2M1 ties", "rows of different scales", "normal", "NaN and Inf", "zeros"])
def test_bf16_mxfp4_qdq_equals_quark(name):
    x = INPUTS[name].bfloat16()
    assert_same_bits(ours("mxfp4")(x.clone()), quark_qdq("mxfp4", x.clone(), observer_path=True), x)


def test_a_nan_poisons_only_its_own_block():
    """OCP MX: a block holding a NaN gets a NaN scale, so its 32 values decode to NaN; its neighbours do not."""
    x = torch.randn(2, 96)
    x[0, 40] = float("nan")
    y = ours("mxfp4")(x)
    assert y[0, 32:64].isnan().all() and not y[0, :32].isnan().any() and not y[0, 64:].isnan().any()
    assert not y[1].isnan().any()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_upstream):
    root = tmp_path_factory.mktemp("qdq-served")
    out = {}
    for fmt, (recipe, _) in FORMATS.items():
        requant.convert(str(tiny_upstream), str(root / recipe), recipe, progress=False)
        out[fmt] = root / recipe
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_served_activations_equal_quark(fmt, served):
    """The inputs a real forward pass feeds each quantized layer: FP32, and Quark rounds them exactly as we do."""
    ckpt = load_checkpoint(str(served[fmt]))
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def recording(module, qdq):
        def qdq_and_record(x):
            y = qdq(x)
            seen.append((module, x.detach().clone(), y.detach().clone()))
            return y
        return qdq_and_record

    quantized = {m: f for m, f in ckpt.activation.items() if f is not None}
    assert quantized and all(f is ours(fmt) for f in quantized.values())
    for module, qdq in quantized.items():
        ckpt.activation[module] = recording(module, qdq)
    model = DeepseekV3Text(ckpt)
    model.forward(torch.arange(3, 40), model.new_cache())
    assert len({m for m, _, _ in seen}) >= len(quantized) // 4, "too few quantized layers were exercised"
    for module, x, y in seen:
        assert x.dtype == torch.float32, f"{module}: the server fed a {x.dtype} activation"
        try:
            assert_same_bits(y, quark_qdq(fmt, x), x)
        except AssertionError as exc:
            raise AssertionError(f"{module}: {exc}") from exc
