"""INT4 pack-quantized decoding, checked against compressed-tensors' own decompression."""

from __future__ import annotations

import json

import torch
from compressed_tensors import ModelCompressor, QuantizationConfig
from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors import safe_open

from requant.formats.int4 import dequantize_int4, unpack_int4


def test_nibble_order_is_least_significant_first():
    # element 8c+i sits in bits 4i..4i+3 of word c, stored as q + 8
    word = sum(((q + 8) & 0xF) << (4 * i) for i, q in enumerate([-8, -1, 0, 1, 7, 3, -4, 2]))
    packed = torch.tensor([[word - (1 << 32) if word >= 1 << 31 else word]], dtype=torch.int32)
    assert unpack_int4(packed, 8).tolist() == [[-8, -1, 0, 1, 7, 3, -4, 2]]


def test_unpack_inverts_compressed_tensors_pack():
    q = torch.randint(-8, 8, (16, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_int4(pack_to_int32(q, num_bits=4), 96), q)


def test_product_is_rounded_once_to_bf16():
    # 7 * 1.9921875 = 13.9453125 = 0b1101.1111001 needs 11 significant bits; BF16 keeps 8: 13.9375
    packed = pack_to_int32(torch.full((1, 32), 7, dtype=torch.int8), num_bits=4)
    scale = torch.tensor([[1.9921875]], dtype=torch.bfloat16)
    assert dequantize_int4(packed, scale, 32)[0, 0].item() == 13.9375


def _check_experts_against_compressed_tensors(upstream) -> int:
    """Every INT4 module of ``upstream`` decoded by requant equals compressed-tensors' decompression; returns the
    number of modules checked."""
    config = json.loads((upstream / "config.json").read_text())["text_config"]["quantization_config"]
    compressor = ModelCompressor(quantization_config=QuantizationConfig.model_validate(config))
    packer = compressor.quantization_compressor["pack-quantized"]
    args = QuantizationArgs(**{k: config["config_groups"]["group_0"]["weights"][k]
                               for k in ("num_bits", "type", "strategy", "group_size", "symmetric")})
    checked = 0
    for shard in sorted(upstream.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_packed")}
        schemes = {m: QuantizationScheme(targets=["Linear"], weights=args) for m in modules}
        for module, decompressed in packer.decompress(str(shard), names_to_scheme=schemes, device="cpu"):
            ours = dequantize_int4(tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"],
                                   int(tensors[f"{module}.weight_shape"][1]))
            assert ours.dtype == decompressed["weight"].dtype == torch.bfloat16
            assert torch.equal(ours, decompressed["weight"]), module
            checked += 1
    return checked


def test_every_expert_matches_compressed_tensors_decompression(tiny_upstream):
    assert _check_experts_against_compressed_tensors(tiny_upstream) == 2 * 8 * 3  # 2 MoE layers x 8 experts x 3


def test_random_code_experts_are_valid_pack_quantized_data(tmp_path):
    """The fast experts of real-width benchmark fixtures (synth --profile k26-layer): every nibble value occurs,
    scales are positive BF16, and compressed-tensors decodes them as requant does; --experts sets the count."""
    import dataclasses

    from requant.testing.synth import PROFILES, synthesize

    profile = dataclasses.replace(PROFILES["tiny"], random_codes=True)
    up = synthesize(tmp_path / "random-codes", profile, seed=0, progress=False, experts=5)
    assert json.loads((up / "config.json").read_text())["text_config"]["n_routed_experts"] == 5
    assert _check_experts_against_compressed_tensors(up) == 2 * 5 * 3
    packed, scales = [], []
    for shard in sorted(up.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            packed += [f.get_tensor(k) for k in f.keys() if k.endswith("weight_packed")]
            scales += [f.get_tensor(k) for k in f.keys() if k.endswith("weight_scale")]
    codes = torch.cat([unpack_int4(p, p.shape[1] * 8).flatten() for p in packed])
    assert set(codes.unique().tolist()) == set(range(-8, 8))
    assert all(s.dtype == torch.bfloat16 and bool((s > 0).all()) for s in scales)
