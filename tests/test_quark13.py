"""The second bit-exact target: ``requant convert --quark-version 0.13`` against AMD Quark 0.13's own file-to-file
export of the same input, for every built-in recipe, on the tiny checkpoint and on an adversarial one; and requant's
INT4 decode against compressed-tensors' current release. Quark 0.13 and compressed-tensors 0.20 run in their own
pinned virtualenv (.venv-quark13, ``make quark13-venv``; ``make test`` builds it), since they need a newer torch
than the project's Quark 0.11.2 stack.

Where the outputs may differ, and why (docs/recipes.md says the same to users): Quark 0.13 writes NaN and +-448 for
BF16 rows whose FP8 scale underflows when rounded to BF16 (amax below about 2**-125); requant writes them finite,
as 0.11 does. The adversarial checkpoint has such rows, and the test checks exactly those rows differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tensors import load_tensors, quark13_divergence, raw

import requant
from requant.formats.int4 import dequantize_int4
from requant.recipe import load_recipe
from requant.testing.quark_reference import quark_equivalents

ROOT = Path(__file__).resolve().parents[1]
Q13_PYTHON = ROOT / ".venv-quark13" / "bin" / "python"
RECIPES = list(quark_equivalents())  # every built-in recipe


def _python() -> str:
    if not Q13_PYTHON.exists():
        pytest.fail(f"{Q13_PYTHON} is missing: `make quark13-venv` builds it (make test does)")
    return str(Q13_PYTHON)


def _run(args: list[str], timeout: int = 900) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([_python(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout




# --- Quark 0.13's exports and requant's ----------------------------------------------------------------------------

def _requant13(upstream: Path, root: Path) -> dict[str, Path]:
    for recipe in RECIPES:
        # Quark's exclude list exactly (the default adds the engines' fused names: test_convert_vs_quark)
        requant.convert(str(upstream), str(root / recipe), recipe, progress=False, quark_version="0.13",
                      fused_excludes=False)
    return {recipe: root / recipe for recipe in RECIPES}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_upstream, adversarial_upstream) -> dict[str, tuple[dict, dict]]:
    """(requant's outputs, Quark 0.13's) by fixture: Quark runs every recipe on both inputs in one process (its
    import alone takes about half a minute)."""
    root = tmp_path_factory.mktemp("q13")
    upstreams = {"tiny": tiny_upstream, "adversarial": adversarial_upstream}
    jobs = [quark.job(str(root / fixture / "quark" / name), src=str(upstream))
            for fixture, upstream in upstreams.items() for name, quark in quark_equivalents().items()]
    _run(["-m", "requant.testing.quark_reference", str(tiny_upstream), json.dumps(jobs)])
    return {fixture: (_requant13(upstream, root / fixture / "requant"),
                      {name: root / fixture / "quark" / name for name in RECIPES})
            for fixture, upstream in upstreams.items()}


@pytest.mark.oracle
@pytest.mark.parametrize("fixture", ["tiny", "adversarial"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_tensors_equal_quark13_export(recipe, fixture, pairs):
    ours, theirs = (load_tensors(side[recipe]) for side in pairs[fixture])
    # the one documented difference: FP8 rows Quark 0.13 makes NaN (its BF16-rounded scale underflows)
    diverged = quark13_divergence(ours, theirs)
    assert all(".self_attn." in name for name in diverged)  # the adversarial rows are attention's
    if fixture == "tiny" or load_recipe(recipe).target("attention") != "fp8_per_channel":
        assert diverged == []
    else:  # the adversarial attention rows under 2**-125 are there, so the divergence must show
        assert diverged


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", RECIPES)
def test_config_equals_quark13_export(recipe, pairs):
    ours_dir, theirs_dir = pairs["tiny"][0][recipe], pairs["tiny"][1][recipe]
    ours = json.loads((ours_dir / "config.json").read_text())
    theirs = json.loads((theirs_dir / "config.json").read_text())
    if not load_recipe(recipe).quantizes:  # Quark writes a config that excludes everything; requant writes none
        theirs.pop("quantization_config")
        assert "quantization_config" not in ours
    assert ours == theirs
    quant = ours.get("quantization_config")
    if quant:
        assert list(quant) == list(theirs["quantization_config"])
        spec = quant["global_quant_config"]["weight"]
        assert list(spec) == list(theirs["quantization_config"]["global_quant_config"]["weight"])
        assert quant["version"] == "0.13"


def test_the_two_targets_differ_where_quark_does(tiny_upstream, pairs, tmp_path):
    """0.11 and 0.13 outputs of the same input differ in the INT4-derived experts (and FP8 scales' dtype) and agree
    elsewhere; the manifest records the choice and `requant verify` checks the 0.13 output."""
    from requant.verification import verify

    requant.convert(str(tiny_upstream), str(tmp_path / "q11"), "fp8-reference", progress=False)
    q11, q13 = load_tensors(tmp_path / "q11"), load_tensors(pairs["tiny"][0]["fp8-reference"])
    experts = [n for n in q11 if ".mlp.experts." in n and n.endswith(".weight")]
    assert experts and all(q13[f"{n}_scale"].dtype == torch.float32 != q11[f"{n}_scale"].dtype for n in experts)
    assert any(raw(q11[n]) != raw(q13[n]) for n in experts)
    same = [n for n in q11 if ".mlp.experts." not in n]
    assert all(raw(q11[n]) == raw(q13[n]) for n in same)
    manifest = json.loads((pairs["tiny"][0]["fp8-reference"] / "requant-manifest.json").read_text())
    assert manifest["recipe"]["quark_version"] == "0.13"
    assert verify(str(pairs["tiny"][0]["fp8-reference"])).tensors == len(q13)


# --- compressed-tensors' current INT4 decode -------------------------------------------------------------------------

_CT_DECODE = """
import json, sys
import torch, compressed_tensors
from compressed_tensors.compressors.base import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors import safe_open
from safetensors.torch import save_file

src, dst = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{src}/config.json"))["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]
args = QuantizationArgs(**{k: cfg[k] for k in ("num_bits", "type", "strategy", "group_size", "symmetric")})
scheme = QuantizationScheme(targets=["Linear"], weights=args)
compressor = BaseCompressor.get_value_from_registry("pack-quantized")
index = json.load(open(f"{src}/model.safetensors.index.json"))["weight_map"]
out = {}
for name in sorted(index):
    if not name.endswith(".weight_packed"):
        continue
    module = name[: -len(".weight_packed")]
    parts = {}
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        with safe_open(f"{src}/{index[f'{module}.{suffix}']}", "pt") as f:
            parts[suffix] = f.get_tensor(f"{module}.{suffix}")
    out[f"{module}.bf16"] = compressor.decompress(state_dict=dict(parts), scheme=scheme)["weight"].contiguous()
    parts["weight_scale"] = parts["weight_scale"].to(torch.float32)  # what Quark 0.13 feeds it
    out[f"{module}.fp32"] = compressor.decompress(state_dict=dict(parts), scheme=scheme)["weight"].contiguous()
save_file(out, dst)
print(compressed_tensors.__version__)
"""


@pytest.mark.oracle
def test_int4_decode_equals_current_compressed_tensors(adversarial_upstream, tmp_path):
    decoded = tmp_path / "ct-decode.safetensors"
    version = _run(["-c", _CT_DECODE, str(adversarial_upstream), str(decoded)]).strip()
    assert version.startswith("0.20"), version
    ours = load_tensors(adversarial_upstream)
    with safe_open(str(decoded), "pt") as f:
        modules = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        assert len(modules) == sum(n.endswith(".weight_packed") for n in ours) > 0
        for module in modules:
            packed, scale = ours[f"{module}.weight_packed"], ours[f"{module}.weight_scale"]
            in_features = int(ours[f"{module}.weight_shape"][1])
            bf16, fp32 = f.get_tensor(f"{module}.bf16"), f.get_tensor(f"{module}.fp32")
            assert raw(dequantize_int4(packed, scale, in_features)) == raw(bf16), module
            assert raw(dequantize_int4(packed, scale, in_features, dtype=torch.float32)) == raw(fp32), module


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# --- Quark 0.13's two-stage NVFP4 weight ---------------------------------------------------------------------------

def _nvfp4_matrices() -> dict[str, torch.Tensor]:
    """BF16 matrices for the two-stage NVFP4 encoder: rows across 2**-30..2**30 with a zero row, tiny, BF16-subnormal
    and huge rows and zero and tiny 16-groups; a matrix that is zero throughout (both of Quark's epsilon
    substitutions); one of BF16 subnormals (an FP32-subnormal weight_scale_2); negatives that round to zero beside
    the tensor's maximum; E2M1's ties of both signs; Gaussians."""
    gen = torch.Generator().manual_seed(5)
    out = {}
    for i in range(8):
        w = torch.randn(16, 64, generator=gen) * torch.exp2(torch.empty(16, 1).uniform_(-30, 30, generator=gen))
        w[0] = 0
        w[1] *= 2.0 ** -110
        w[2] = torch.randn(64, generator=gen) * 2.0 ** -128
        w[3] = torch.randn(64, generator=gen) * 1e30
        groups = w.view(16, -1, 16)
        pick = torch.rand(groups.shape[:2], generator=gen)
        groups[pick < 0.1] = 0
        groups[(pick >= 0.1) & (pick < 0.2)] *= 2.0 ** -20
        out[f"adversarial{i}"] = w.to(torch.bfloat16)
    out["zero"] = torch.zeros(4, 32, dtype=torch.bfloat16)
    out["subnormal"] = (torch.randn(4, 32, generator=gen) * 2.0 ** -128).to(torch.bfloat16)  # weight_scale_2 too
    out["rounds-to-signed-zero"] = torch.tensor([[6.0] + [-0.01] * 15 + [-0.0] * 16], dtype=torch.bfloat16)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4).reshape(2, 16)
    out["ties"] = (ties * torch.tensor([[1.0], [-1.0]])).to(torch.bfloat16)
    out["gaussian"] = torch.randn(64, 128, generator=gen).to(torch.bfloat16)
    return out


@pytest.mark.oracle
def test_nvfp4_weight_encoder_equals_quark13s(tmp_path, tiny_upstream):
    """requant's two-stage NVFP4 encoder (formats.nvfp4.quantize_nvfp4_quark) against Quark 0.13 (one process): the
    function its file-to-file export calls for the template's ``nvfp4`` weight (FP4 per 16, FP8 E4M3 block scales,
    FP32 weight_scale_2) on the crafted matrices, and that export of the tiny checkpoint's routed experts (decoded
    from INT4 in FP32, as Quark decodes them): every byte of the codes, the block scales and the global scale."""
    from safetensors.torch import load_file, save_file

    from requant.formats.nvfp4 import quantize_nvfp4_quark

    matrices = _nvfp4_matrices()
    save_file(matrices, str(tmp_path / "in.safetensors"))
    experts = ["*self_attn*", "*mlp.gate", "*lm_head", "*shared_experts*", "*layers.0.*", "*vision*", "*mm_projector*"]
    jobs = [{"nvfp4_weights": str(tmp_path / "in.safetensors"), "dst": str(tmp_path / "quark.safetensors")},
            {"dst": str(tmp_path / "export"), "scheme": "nvfp4", "exclude": experts}]
    _run(["-m", "requant.testing.quark_reference", str(tiny_upstream), json.dumps(jobs)])
    theirs = load_file(str(tmp_path / "quark.safetensors"))
    for name, weight in matrices.items():
        ours = dict(zip(("weight", "weight_scale", "weight_scale_2"), quantize_nvfp4_quark(weight)))
        for part, tensor in ours.items():
            expected = theirs[f"{name}.{part}"]
            assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, (name, part)
            assert raw(tensor) == raw(expected), (name, part)
    upstream, exported = load_tensors(tiny_upstream), load_tensors(tmp_path / "export")
    modules = sorted(name.removesuffix(".weight_scale_2") for name in exported if name.endswith(".weight_scale_2"))
    assert len(modules) == 2 * 8 * 3 and all(".mlp.experts." in m for m in modules)  # 2 MoE layers x 8 x 3
    for module in modules:
        weight = dequantize_int4(upstream[f"{module}.weight_packed"], upstream[f"{module}.weight_scale"],
                                 int(upstream[f"{module}.weight_shape"][1]), dtype=torch.float32)
        for part, tensor in zip(("weight", "weight_scale", "weight_scale_2"), quantize_nvfp4_quark(weight)):
            assert raw(tensor) == raw(exported[f"{module}.{part}"]), (module, part)
