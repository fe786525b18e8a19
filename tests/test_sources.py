"""Every upstream format the family ships, converted with every built-in recipe and compared with the libraries that
define the formats:

* decode: compressed-tensors 0.20's own converters (``FP8BlockDequantizer`` for FP8-block sources,
  ``CompressedTensorsDequantizer`` for MXFP4), run on the CPU in .venv-quark13 (tests/ct_decode.py): requant's
  ``bf16-staging`` output equals their BF16 checkpoint tensor for tensor, byte for byte.
* encode: AMD Quark 0.11.2's file-to-file export of that BF16 decode (Quark reads FP8 sources only on a CUDA
  device; its GPU path is DeepSeek's kernel, the same FP32 multiply and one BF16 rounding): requant's output from the
  quantized source equals it byte for byte, config.json included, for every recipe.
* MXFP4 sources into MXFP4 are repacked, not requantized: their routed experts are compared with the source through
  compressed-tensors' own decode (the same values; negative zeros written +0, nothing else changed).

The upstreams are the synthetic releases (DeepSeek-V3 with its MTP layer, Kimi-K2-Instruct, an MXFP4 and a BF16
release of K2.6's layout), made adversarial: FP8 scales across FP32's range (subnormal included), zero blocks and
scales, subnormal and extreme FP8 codes, E8M0 exponents at both ends.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tensors import load_tensors, quark13_divergence, raw

import requant
from requant.cli import main
from requant.errors import CheckpointError, PlanError
from requant.layout import VLM_TEXT_PREFIX
from requant.recipe import load_recipe
from requant.testing.quark_reference import file2file_command, quark_equivalents
from requant.testing.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
Q13_PYTHON = ROOT / ".venv-quark13" / "bin" / "python"
RECIPES = list(quark_equivalents())  # every built-in Quark export (the compressed-tensors ones: test_convert_vs_llmcompressor)
# What a Quark user adds to a recipe's exclude list for a DeepSeek-V3 checkpoint: the MTP layer's projection and head,
# which the engines build unquantized (requant never quantizes them; see requant.layout.ENGINE_UNQUANTIZED).
MTP_EXCLUDES = ["*eh_proj", "*shared_head.head"]
FP8_NAN = 0x7F


def _adversarial_fp8(directory: Path, seed: int = 1) -> None:
    """Rewrite every FP8 block-scaled weight of a synthetic upstream in place: block scales across FP32's range
    (2**-140 subnormal to 2**100), zero scales, all-zero blocks, blocks of subnormal E4M3 codes (and -0), +-448."""
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
            weight_name = name.removesuffix("_scale_inv")
            scale, codes = tensors[name], tensors[weight_name].view(torch.uint8).clone()
            rows, cols = scale.shape
            kind = torch.randint(0, 10, (rows, cols), generator=gen)
            exponent = torch.randint(-140, 101, (rows, cols), generator=gen).double()
            scale = torch.where(kind <= 2, torch.exp2(exponent).float(), scale)
            scale[kind == 3] = 0.0
            for r, c in (kind >= 4).nonzero().tolist():
                block = codes[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
                if kind[r, c] == 4:
                    block.zero_()
                elif kind[r, c] == 5:  # subnormals (exponent field 0), either sign, and -0
                    block.copy_(torch.randint(0, 8, block.shape, generator=gen, dtype=torch.uint8)
                                | (torch.randint(0, 2, block.shape, generator=gen, dtype=torch.uint8) << 7))
                elif kind[r, c] == 6:  # the largest magnitude, 448
                    block.copy_(torch.where(torch.rand(block.shape, generator=gen) < 0.5, 0x7E, 0xFE).to(torch.uint8))
            tensors[name], tensors[weight_name] = scale.contiguous(), codes.view(torch.float8_e4m3fn)
        save_file(tensors, str(shard), metadata={"format": "pt"})


def _adversarial_mxfp4(directory: Path, seed: int = 2) -> None:
    """Rewrite every MXFP4 weight in place: E8M0 exponents at both ends (bytes 0, 1, 252: the largest whose decode stays
    within BF16), all-zero blocks, and negative zeros (code 0x8) beside every other code."""
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name in [n for n in tensors if n.endswith(".weight_packed")]:
            scale_name = name.replace(".weight_packed", ".weight_scale")
            packed, scale = tensors[name].clone(), tensors[scale_name].clone()
            kind = torch.randint(0, 8, scale.shape, generator=gen)
            scale[kind == 0], scale[kind == 1], scale[kind == 2] = 0, 1, 252
            negative_zeros = torch.randint(0, 4, packed.shape, generator=gen) == 0
            packed[negative_zeros] = (packed[negative_zeros] & 0xF0) | 0x08
            for r, b in (kind == 3).nonzero().tolist():
                packed[r, b * 16:(b + 1) * 16] = 0
            tensors[name], tensors[scale_name] = packed, scale
        save_file(tensors, str(shard), metadata={"format": "pt"})


def _ct_decode(src: Path, dst: Path) -> Path:
    if not Q13_PYTHON.exists():
        pytest.fail(f"{Q13_PYTHON} is missing: `make quark13-venv` builds it (make test does)")
    proc = subprocess.run([str(Q13_PYTHON), str(ROOT / "tests" / "ct_decode.py"), str(src), str(dst)],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dst


def _quark_exports(src: Path, root: Path, extra_exclude: list[str]) -> dict[str, Path]:
    jobs = []
    for name, quark in quark_equivalents().items():
        job = quark.job(str(root / name))
        job["exclude"] = job["exclude"] + extra_exclude
        jobs.append(job)
    proc = subprocess.run(file2file_command(str(src), jobs), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: root / name for name in quark_equivalents()}


# upstream -> (profile, adversarial rewrite, extra Quark excludes)
UPSTREAMS = {
    "deepseek-v3": ("deepseek-v3", _adversarial_fp8, MTP_EXCLUDES),
    "kimi-mxfp4": ("kimi-mxfp4", _adversarial_mxfp4, []),
    "kimi-bf16": ("kimi-bf16", None, []),
}


_DECODED: dict[str, tuple[Path, Path]] = {}


def _decoded_upstream(name: str, tmp_path_factory) -> tuple[Path, Path]:
    """One adversarial upstream and its compressed-tensors BF16 decode (a BF16 upstream is its own), made once."""
    if name not in _DECODED:
        profile, adversarial, _ = UPSTREAMS[name]
        root = tmp_path_factory.mktemp(name)
        upstream = synthesize(root / "upstream", profile, progress=False)
        if adversarial is not None:
            adversarial(upstream)
        _DECODED[name] = upstream, _ct_decode(upstream, root / "ct-bf16") if adversarial is not None else upstream
    return _DECODED[name]


@pytest.fixture(scope="module", params=list(UPSTREAMS))
def source(request, tmp_path_factory):
    """One adversarial upstream, its compressed-tensors BF16 decode, Quark's export of that for every recipe, and
    requant's conversion of the upstream itself for every recipe."""
    name = request.param
    upstream, decoded = _decoded_upstream(name, tmp_path_factory)
    root = upstream.parent
    quark = _quark_exports(decoded, root / "quark", UPSTREAMS[name][2])
    ours = {}
    for recipe in RECIPES:
        assert main(["convert", str(upstream), str(root / "requant" / recipe), "--recipe", recipe, "--local",
                     "--no-fused-excludes"]) == 0
        ours[recipe] = root / "requant" / recipe
    return {"name": name, "upstream": upstream, "decoded": decoded, "quark": quark, "ours": ours}


def _repacks(recipe: str, source: dict) -> bool:
    """Whether the recipe repacks the MXFP4 source's routed experts (compared with the source, not with Quark's
    re-encoding of their decode: test_mxfp4_source_is_repacked_not_requantized)."""
    return source["name"] == "kimi-mxfp4" and load_recipe(recipe).target("routed_expert") == "mxfp4"


@pytest.mark.oracle
def test_bf16_staging_equals_compressed_tensors_decode(source):
    ours, theirs = load_tensors(source["ours"]["bf16-staging"]), load_tensors(source["decoded"])
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert (ours[name].dtype, ours[name].shape) == (theirs[name].dtype, theirs[name].shape), name
        assert raw(ours[name]) == raw(theirs[name]), name


@pytest.mark.oracle
def test_the_reference_server_reads_the_upstream_as_compressed_tensors_decodes_it(source):
    """`requant serve` loads an upstream in any source format: every weight it holds equals compressed-tensors'
    BF16 decode of the upstream (the reference model runs in FP32; BF16 values are exact in it)."""
    from requant.serving.checkpoint import load_checkpoint

    loaded = load_checkpoint(str(source["upstream"]))
    decoded = {name.removeprefix(VLM_TEXT_PREFIX): t for name, t in load_tensors(source["decoded"]).items()}
    assert set(loaded.schemes.values()) >= {"bf16"}
    for name, weight in loaded.weights.items():
        assert torch.equal(weight, decoded[name].to(weight.dtype)), name


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_equals_quark_export_of_the_decode(source, recipe):
    ours, theirs = load_tensors(source["ours"][recipe]), load_tensors(source["quark"][recipe])
    assert sorted(ours) == sorted(theirs)
    repacked = 0
    for name in ours:
        assert (ours[name].dtype, ours[name].shape) == (theirs[name].dtype, theirs[name].shape), name
        if _repacks(recipe, source) and ".mlp.experts." in name:
            repacked += 1
            continue
        assert raw(ours[name]) == raw(theirs[name]), name
    assert bool(repacked) == _repacks(recipe, source)
    config, quark_config = (json.loads((d / "config.json").read_text()) for d in (source["ours"][recipe],
                                                                                   source["quark"][recipe]))
    if "quantization_config" not in config:
        quark_config.pop("quantization_config")  # a recipe that quantizes nothing writes none; Quark one of nothing
    assert config == quark_config


@pytest.fixture(scope="module", params=list(UPSTREAMS))
def quark13(request, tmp_path_factory):
    """requant's ``--quark-version 0.13`` conversions of one adversarial upstream, and Quark 0.13's own export of its
    compressed-tensors decode (in .venv-quark13), for every recipe."""
    name = request.param
    upstream, decoded = _decoded_upstream(name, tmp_path_factory)
    root = tmp_path_factory.mktemp(f"q13-{name}")
    jobs = []
    for recipe, quark in quark_equivalents().items():
        job = quark.job(str(root / "quark" / recipe))
        jobs.append({**job, "exclude": job["exclude"] + UPSTREAMS[name][2]})
    if not Q13_PYTHON.exists():
        pytest.fail(f"{Q13_PYTHON} is missing: `make quark13-venv` builds it (make test does)")
    proc = subprocess.run([str(Q13_PYTHON), "-m", "requant.testing.quark_reference", str(decoded), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for recipe in RECIPES:
        requant.convert(str(upstream), str(root / "requant" / recipe), recipe, progress=False, quark_version="0.13",
                        fused_excludes=False)
    (root / "decoded").symlink_to(decoded)
    return {"name": name, "root": root, "upstream": upstream}


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", RECIPES)
def test_quark13_target_from_every_source_equals_quark13_export(recipe, quark13):
    """The second Quark release from each source format. The one documented difference (tests/tensors.py:
    quark13_divergence: FP8 rows of amax in (0, ~2**-125)) does not arise from the FP8-block source: the decode of
    the tiniest block scales underflows BF16 to zero rows (checked here), which both write alike. An MXFP4 source's
    experts in an MXFP4 target are repacked, not re-encoded (test_mxfp4_source_is_repacked_not_requantized): there
    the codes are the upstream's with -0 made +0, and the scales the upstream's with byte 0 written as 1, as Quark
    0.13 stores exponent -127."""
    root, name = quark13["root"], quark13["name"]
    if name == "deepseek-v3":
        amax = [t.float().abs().amax(dim=1) for t in load_tensors(root / "decoded").values() if t.dim() == 2]
        assert not any(((a > 0) & (a < 2.0 ** -125)).any() for a in amax) and any((a == 0).any() for a in amax)
    ours, theirs = (load_tensors(root / side / recipe) for side in ("requant", "quark"))
    if _repacks(recipe, {"name": name}):
        upstream = load_tensors(quark13["upstream"])
        repacked = [n for n in ours if ".mlp.experts." in n]
        for tensor in repacked:
            module, param = tensor.rsplit(".", 1)
            if param == "weight_scale":
                scale = upstream[f"{module}.weight_scale"]
                assert torch.equal(ours[tensor], torch.where(scale == 0, 1, scale).to(torch.uint8)), tensor
            else:
                packed = upstream[f"{module}.weight_packed"]
                low, high = packed & 0x0F, packed >> 4
                expect = torch.where(low == 8, 0, low) | (torch.where(high == 8, 0, high) << 4)
                assert torch.equal(ours[tensor], expect.to(torch.uint8)), tensor
            assert (ours[tensor].dtype, ours[tensor].shape) == (theirs[tensor].dtype, theirs[tensor].shape), tensor
            ours.pop(tensor), theirs.pop(tensor)
        assert repacked
    assert quark13_divergence(ours, theirs) == []
    config, quark_config = (json.loads((root / side / recipe / "config.json").read_text())
                            for side in ("requant", "quark"))
    if "quantization_config" not in config:
        quark_config.pop("quantization_config")
    assert config == quark_config


@pytest.mark.oracle
def test_mxfp4_source_is_repacked_not_requantized(tmp_path):
    """An MXFP4 release's routed experts keep their codes and scales in Quark's MXFP4: compressed-tensors decodes the
    output (read as its own format) to exactly the values it decodes the upstream to; only -0 codes became +0. Quark's
    re-encoding of those values would differ (its scale rule moves blocks whose largest code is 6)."""
    upstream = synthesize(tmp_path / "upstream", "kimi-mxfp4", progress=False)
    _adversarial_mxfp4(upstream)
    requant.convert(str(upstream), str(tmp_path / "out"), "amd-kimi-k25-mxfp4", progress=False)
    ours, source = load_tensors(tmp_path / "out"), load_tensors(upstream)
    experts = [n.removesuffix(".weight_packed") for n in source if ".mlp.experts." in n and n.endswith("weight_packed")]
    assert experts
    negative_zeros = 0
    for module in experts:
        packed, scale = source[f"{module}.weight_packed"], source[f"{module}.weight_scale"]
        assert torch.equal(ours[f"{module}.weight_scale"], scale), module
        low, high = packed & 0x0F, packed >> 4
        negative_zeros += int((low == 8).sum() + (high == 8).sum())
        expect = torch.where(low == 8, 0, low) | (torch.where(high == 8, 0, high) << 4)
        assert torch.equal(ours[f"{module}.weight"], expect.to(torch.uint8)), module
    assert negative_zeros
    # compressed-tensors decodes the output, stored back in its own format, to the upstream's values
    as_ct = tmp_path / "as-ct"
    as_ct.mkdir()
    for f in upstream.iterdir():
        if not f.name.endswith(".safetensors"):
            (as_ct / f.name).write_bytes(f.read_bytes())
    renamed = {}
    for name, tensor in source.items():
        module = name.rsplit(".", 1)[0]
        if module in experts:
            param = name.rsplit(".", 1)[1]
            renamed[name] = ours[f"{module}.weight" if param == "weight_packed" else f"{module}.weight_scale"]
        else:
            renamed[name] = tensor
    index = json.loads((upstream / "model.safetensors.index.json").read_text())
    for shard in {v for v in index["weight_map"].values()}:
        save_file({n: t.contiguous() for n, t in renamed.items() if index["weight_map"][n] == shard}, str(as_ct / shard))
    a, b = load_tensors(_ct_decode(upstream, tmp_path / "ct-up")), load_tensors(_ct_decode(as_ct, tmp_path / "ct-out"))
    for module in experts:
        assert torch.equal(a[f"{module}.weight"], b[f"{module}.weight"]), module  # -0 == +0, every other value equal


@pytest.mark.oracle
def test_transformers_fp8_dequantization_agrees_where_it_takes_the_blocks(tmp_path_factory):
    """transformers' own FP8 dequantization (the Fp8Dequantize conversion of ``FineGrainedFP8Config(dequantize=True)``)
    gives requant's BF16 decode, byte for byte, for every FP8-block weight of the adversarial DeepSeek-V3 upstream
    it accepts. transformers 5.24 derives the block from the scale grid and refuses a partial one: DeepSeek-V3's
    kv_a_proj_with_mqa ([576, H], 5 block rows) cannot be loaded dequantized there at all."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    upstream, _ = _decoded_upstream("deepseek-v3", tmp_path_factory)
    ours_dir = upstream.parent / "transformers-check"
    requant.convert(str(upstream), str(ours_dir), "bf16-staging", progress=False)
    ours, theirs = load_tensors(ours_dir), load_tensors(upstream)
    agreed, refused = [], []
    for name, scale in theirs.items():
        if not name.endswith(".weight_scale_inv"):
            continue
        weight = name.removesuffix("_scale_inv")
        try:
            decoded = Fp8Dequantize(None)._dequantize_one(theirs[weight], scale, output_dtype=torch.bfloat16)
        except ValueError as e:
            assert "not divisible by scale grid" in str(e), e
            refused.append(weight)
            continue
        assert raw(decoded) == raw(ours[weight]), weight
        agreed.append(weight)
    assert agreed and all(any(t % 128 for t in theirs[w].shape) for w in refused)
    assert {w.rsplit(".", 2)[-2] for w in refused} == {"kv_a_proj_with_mqa"}, refused


@pytest.mark.oracle
def test_kimi_k2_instruct_decodes_as_compressed_tensors(tmp_path):
    """Kimi-K2-Instruct's layout (text-only, rotary inv_freq buffers carried through)."""
    upstream = synthesize(tmp_path / "upstream", "kimi-k2-instruct", progress=False)
    requant.convert(str(upstream), str(tmp_path / "out"), "bf16-staging", progress=False)
    ours, theirs = load_tensors(tmp_path / "out"), load_tensors(_ct_decode(upstream, tmp_path / "ct"))
    assert sorted(ours) == sorted(theirs) and any(n.endswith("rotary_emb.inv_freq") for n in ours)
    for name in ours:
        assert raw(ours[name]) == raw(theirs[name]), name


def test_manifest_and_card_record_the_source_format(tmp_path):
    for profile, fmt in (("deepseek-v3", "fp8-block"), ("kimi-mxfp4", "mxfp4"), ("kimi-bf16", "bf16"), ("tiny", "int4")):
        upstream = synthesize(tmp_path / profile, profile, progress=False)
        out = tmp_path / f"out-{profile}"
        requant.convert(str(upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
        manifest = json.loads((out / "requant-manifest.json").read_text())
        assert manifest["source"]["format"] == fmt
        assert f"| Upstream format | `{fmt}`" in (out / "README.md").read_text()


def test_a_recipe_may_drop_the_mtp_layer(tmp_path):
    """``mtp: drop`` leaves the MTP layer's tensors out and sets num_nextn_predict_layers to 0; every other tensor
    is the default (keep) conversion's, byte for byte, and the exclude list no longer names the layer."""
    upstream = synthesize(tmp_path / "up", "deepseek-v3", progress=False)
    recipe = yaml.safe_load((ROOT / "requant/recipes/kimi-k2.6-mxfp4.yaml").read_text())
    recipe.update(name="kimi-k2.6-mxfp4-no-mtp", mtp="drop")
    (tmp_path / "no-mtp.yaml").write_text(yaml.safe_dump(recipe))
    requant.convert(str(upstream), str(tmp_path / "keep"), "kimi-k2.6-mxfp4", progress=False)
    requant.convert(str(upstream), str(tmp_path / "drop"), str(tmp_path / "no-mtp.yaml"), progress=False)
    requant.verify(str(tmp_path / "drop"))
    config = json.loads((tmp_path / "drop/config.json").read_text())
    mtp = f"model.layers.{config['num_hidden_layers']}."
    assert config["num_nextn_predict_layers"] == 0
    assert json.loads((tmp_path / "keep/config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not any(mtp in name or "model.eh_proj" in name for name in config["quantization_config"]["exclude"])
    kept, dropped = load_tensors(tmp_path / "keep"), load_tensors(tmp_path / "drop")
    assert any(name.startswith(mtp) for name in kept)
    assert set(dropped) == {name for name in kept if not name.startswith(mtp)}
    for name, tensor in dropped.items():
        assert torch.equal(tensor.view(torch.uint8), kept[name].view(torch.uint8)), name
    manifest = json.loads((tmp_path / "drop/requant-manifest.json").read_text())
    assert manifest["recipe"]["mtp"] == "drop"


def test_a_model_optimizer_export_keeps_the_mtp_layer_bf16_as_nvidia_ships_it(tmp_path):
    """modelopt-nvfp4 (``mtp: unquantized``) leaves every tensor of the MTP layer as the upstream decoded to BF16,
    the other layers as without an MTP layer; Model Optimizer's exclude list names the layer with a wildcard, as
    NVIDIA's releases do (``model.layers.61*``), and SGLang's draft head name; verify passes."""
    from requant.export.modelopt import excluded

    upstream = synthesize(tmp_path / "up", "deepseek-v3", progress=False)
    requant.convert(str(upstream), str(tmp_path / "out"), "modelopt-nvfp4", progress=False)
    requant.verify(str(tmp_path / "out"))
    config = json.loads((tmp_path / "out/config.json").read_text())
    mtp = f"model.layers.{config['num_hidden_layers']}."
    tensors = load_tensors(tmp_path / "out")
    in_mtp = {name: t for name, t in tensors.items() if name.startswith(mtp)}
    assert any(".mlp.experts." in name for name in in_mtp)
    weights = {name: t.dtype for name, t in in_mtp.items() if not name.endswith("e_score_correction_bias")}
    assert set(weights.values()) == {torch.bfloat16} and all(n.endswith(".weight") for n in weights), weights
    assert any(name.endswith("weight_scale_2") for name in tensors)  # the other layers' experts are NVFP4
    exclude = json.loads((tmp_path / "out/hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert f"{mtp.rstrip('.')}*" in exclude and config["quantization_config"]["ignore"] == exclude
    assert excluded("model.shared_head.head", exclude)  # SGLang's NEXTN draft model asks about its head so
    manifest = json.loads((tmp_path / "out/requant-manifest.json").read_text())
    assert manifest["recipe"]["mtp"] == "unquantized"
    assert not any(name.startswith(mtp) for name in manifest["stats"])


# --- refusals ------------------------------------------------------------------------------------------------------

def _edit_config(upstream: Path, edit) -> None:
    path = upstream / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _rewrite(upstream: Path, name: str, change) -> str:
    index = json.loads((upstream / "model.safetensors.index.json").read_text())
    shard = upstream / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard.name


@pytest.fixture
def fp8_upstream(tmp_path):
    return synthesize(tmp_path / "up", "deepseek-v3", progress=False)


def test_nan_fp8_code_is_refused_with_its_name(fp8_upstream, tmp_path):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    shard = _rewrite(fp8_upstream, name, lambda t: torch.cat([torch.full((1, t.shape[1]), FP8_NAN, dtype=torch.uint8),
                                                               t.view(torch.uint8)[1:]]).view(torch.float8_e4m3fn))
    with pytest.raises(CheckpointError, match=rf"{shard}.*{name}.*NaN"):
        requant.convert(str(fp8_upstream), str(tmp_path / "out"), "kimi-k2.6-mxfp4", progress=False)
    assert not (tmp_path / "out" / "requant-manifest.json").exists()


def test_infinite_scale_is_refused(fp8_upstream, tmp_path):
    name = "model.layers.2.self_attn.o_proj.weight_scale_inv"
    _rewrite(fp8_upstream, name, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    with pytest.raises(CheckpointError, match=rf"{name}.*NaN/Inf"):
        requant.convert(str(fp8_upstream), str(tmp_path / "out"), "bf16-staging", progress=False)


def test_ue8m0_scales_must_be_powers_of_two(fp8_upstream, tmp_path):
    _edit_config(fp8_upstream, lambda c: c["quantization_config"].update(scale_fmt="ue8m0"))
    with pytest.raises(CheckpointError, match="not powers of two.*ue8m0"):
        requant.convert(str(fp8_upstream), str(tmp_path / "out"), "bf16-staging", progress=False)
    for shard in fp8_upstream.glob("*.safetensors"):  # DeepSeek-V3.1: every scale rounded up to a power of two
        tensors = load_file(str(shard))
        for n in [n for n in tensors if n.endswith("weight_scale_inv")]:
            tensors[n] = torch.exp2(torch.ceil(torch.log2(tensors[n])))
        save_file(tensors, str(shard), metadata={"format": "pt"})
    requant.convert(str(fp8_upstream), str(tmp_path / "ok"), "bf16-staging", progress=False)


def test_e8m0_nan_scale_is_refused(tmp_path):
    upstream = synthesize(tmp_path / "up", "kimi-mxfp4", progress=False)
    name = "language_model.model.layers.1.mlp.experts.0.up_proj.weight_scale"
    _rewrite(upstream, name, lambda t: t.index_fill(0, torch.tensor([0]), 0xFF))
    with pytest.raises(CheckpointError, match=rf"{name}.*0xFF"):
        requant.convert(str(upstream), str(tmp_path / "out"), "kimi-k2.6-mxfp4", progress=False)


def test_values_that_decode_beyond_bf16_are_refused(tmp_path):
    """E8M0 2**126 times code 6 is 1.5 * 2**128, beyond BF16 (and FP32): refused by name, not converted to Inf."""
    upstream = synthesize(tmp_path / "up", "kimi-mxfp4", progress=False)
    module = "language_model.model.layers.2.mlp.experts.5.gate_proj"
    _rewrite(upstream, f"{module}.weight_scale", lambda t: t.index_fill(0, torch.tensor([0]), 253))
    _rewrite(upstream, f"{module}.weight_packed", lambda t: t.index_fill(0, torch.tensor([0]), 0x77))
    with pytest.raises(CheckpointError, match=rf"{module}.weight_packed.*beyond BF16"):
        requant.convert(str(upstream), str(tmp_path / "out"), "fp8-reference", progress=False)


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(quant_method="awq"), "quant_method 'awq' is not one requant reads"),
    (lambda q: q.update(fmt="e5m2"), "fmt 'e5m2'"),
    (lambda q: q.pop("weight_block_size"), "weight_block_size is missing"),
    (lambda q: q.update(weight_block_size=[128]), "weight_block_size \\[128\\] is not two positive integers"),
    (lambda q: q.update(scale_fmt="e4m3"), "scale_fmt 'e4m3'"),
])
def test_unknown_source_formats_are_refused_naming_the_key(fp8_upstream, tmp_path, edit, message):
    _edit_config(fp8_upstream, lambda c: edit(c["quantization_config"]))
    with pytest.raises(CheckpointError, match=f"config.json.*{message}"):
        requant.convert(str(fp8_upstream), str(tmp_path / "out"), "bf16-staging", progress=False)


def test_tensors_that_contradict_the_declared_format_are_refused_before_any_job(fp8_upstream, tmp_path):
    """An FP8-block config over INT4 tensors (a mislabelled release) is refused at planning, naming each module."""
    int4 = synthesize(tmp_path / "int4", "tiny", progress=False)
    _edit_config(int4, lambda c: c["text_config"].update(quantization_config=json.loads(
        (fp8_upstream / "config.json").read_text())["quantization_config"]))
    with pytest.raises(PlanError, match="stored as int4 .* declares fp8-block"):
        requant.convert(str(int4), str(tmp_path / "out"), "bf16-staging", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"  # a scale of the wrong shape: named
    _rewrite(fp8_upstream, name, lambda t: t[:-1].contiguous())
    with pytest.raises(PlanError, match=rf"{name}: F32\[4, 1\], config implies F32\[5, 1\]"):
        requant.convert(str(fp8_upstream), str(tmp_path / "out2"), "bf16-staging", progress=False)
