"""The reference model against transformers' DeepseekV3ForCausalLM (the oracle) on the same weights."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_model

from requant.serving.checkpoint import load_checkpoint
from requant.serving.model import DeepseekV3Text

pytestmark = pytest.mark.oracle


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_logits_match_transformers(tiny_variants, dtype, atol):
    """BF16 weights: float64 equal to 1e-10 (same math), float32 within kernel-order rounding."""
    ckpt = load_checkpoint(str(tiny_variants["bf16-staging"]), dtype=dtype)
    ours = DeepseekV3Text(ckpt)
    oracle = hf_model(ckpt).to(dtype)
    ids = _ids(48)
    with torch.no_grad():
        expected = oracle(ids[None]).logits[0]
    got = ours.forward(ids, ours.new_cache())
    assert got.shape == expected.shape == (48, ckpt.text_config["vocab_size"])
    assert (got.double() - expected.double()).abs().max().item() < atol
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_incremental_decode_matches_full_forward(tiny_variants):
    """The key/value cache: prefill + one-token steps give the logits of one full pass."""
    model = DeepseekV3Text(load_checkpoint(str(tiny_variants["kimi-k2.6-mxfp4"])))
    ids = _ids(24, seed=2)
    full = model.forward(ids, model.new_cache())
    cache = model.new_cache()
    steps = [model.forward(ids[:16], cache)] + [model.forward(ids[i:i + 1], cache) for i in range(16, 24)]
    assert (torch.cat(steps) - full).abs().max().item() < 1e-4      # FP32 matmul-shape rounding only


def test_yarn_rope_matches_transformers(tiny_variants):
    """Frequencies and the attention scale at long positions, where YaRN's interpolation matters."""
    ckpt = load_checkpoint(str(tiny_variants["bf16-staging"]))
    ours, oracle = DeepseekV3Text(ckpt), hf_model(ckpt)
    assert torch.equal(ours.inv_freq, oracle.model.rotary_emb.inv_freq)
    assert ours.softmax_scale == pytest.approx(oracle.model.layers[0].self_attn.scaling, rel=1e-12)
    assert ours.cos_factor == pytest.approx(oracle.model.rotary_emb.attention_scaling, rel=1e-12)


def test_upstream_int4_serves_as_its_bf16_staging(tiny_variants):
    """INT4 is dequantized exactly as compressed-tensors does; BF16 staging is that dequantization."""
    a = DeepseekV3Text(load_checkpoint(str(tiny_variants["upstream"])))
    b = DeepseekV3Text(load_checkpoint(str(tiny_variants["bf16-staging"])))
    ids = _ids(16, seed=3)
    assert torch.equal(a.forward(ids, a.new_cache()), b.forward(ids, b.new_cache()))


def test_quantized_variants_load_with_activation_qdq(tiny_variants):
    mx = load_checkpoint(str(tiny_variants["kimi-k2.6-mxfp4"]))
    fp8 = load_checkpoint(str(tiny_variants["fp8-reference"]))
    assert mx.scheme_counts()["mxfp4"] == 2 * 8 * 3 + 2          # 2 MoE layers x 8 experts x 3 + 2 routers
    assert fp8.scheme_counts()["fp8"] == 2 * 8 * 3
    expert = "model.layers.1.mlp.experts.0.gate_proj"
    assert mx.activation[expert].__name__ == "mxfp4_qdq" and fp8.activation[expert].__name__ == "fp8_per_token_qdq"
    assert mx.activation["model.layers.1.self_attn.o_proj"] is None
    ids = _ids(64, seed=4)
    bf16 = load_checkpoint(str(tiny_variants["bf16-staging"]))
    logits = {}
    for name, ckpt in (("mxfp4", mx), ("fp8", fp8), ("bf16", bf16)):
        model = DeepseekV3Text(ckpt)
        logits[name] = model.forward(ids, model.new_cache())

    def cosine(a: str) -> float:
        return torch.nn.functional.cosine_similarity(logits[a], logits["bf16"], dim=-1).mean().item()

    # The tiny random model is fragile (an MXFP4 router flips experts), but both stay close to BF16;
    # an unrelated model of the same shape scores ~0 here.
    assert 0.95 < cosine("fp8") < 1.0
    assert 0.5 < cosine("mxfp4") < cosine("fp8")
