"""Synthetic upstream checkpoints with Kimi-K2.6's exact layout, for tests and benchmarks.

``tiny`` has every kind of tensor at toy sizes (seconds to build); ``k26-topology`` has K2.6's exact
topology (61 layers, layer 0 dense, 384 routed + 1 shared expert, top-8, MLA) at small widths.
Routed experts are INT4 quantized the way compressed-tensors' symmetric group quantizer does it and
packed by compressed-tensors' own ``pack_to_int32``; shards are cut by size, so layers straddle
shard boundaries as in the real checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32
from tqdm import tqdm

from requant.constants import (
    FP8_BLOCK_DEFAULT,
    FP8_E4M3_MAX,
    INT4_GROUP_SIZE,
    INT4_MAX,
    INT4_MIN,
    MX_BLOCK_SIZE,
)
from requant.errors import RequantError
from requant.formats.fp8_block import block_grid
from requant.formats.mxfp4 import quantize_mxfp4_ct
from requant.formats.nvfp4 import NVFP4_GROUP, quantize_nvfp4, quantize_nvfp4_modelopt
from requant.formats.source import MODULE_PARAMS, SourceFormat
from requant.io.checksums import check_sums
from requant.io.safetensors import TORCH_TO_NAME, SafetensorsWriter, TensorSpec, file_head
from requant.layout import VLM_TEXT_PREFIX
from requant.manifest import HF_QUANT_CONFIG
from requant.tokenizer import SPECIAL_TOKENS, write_tokenizer

VISION_PATCH = 14
VISION_HEADS = 2


@dataclass(frozen=True)
class Profile:
    layers: int
    hidden: int
    intermediate: int
    moe_intermediate: int
    experts: int
    top_k: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    vocab: int
    vision_hidden: int
    vision_blocks: int
    shards: int
    random_codes: bool = False  # routed experts with random INT4 codes (fast at real widths), not quantized Gaussians
    architecture: str = "kimi-k25"  # one of ARCHITECTURES: the release whose layout and config it copies
    source: SourceFormat = SourceFormat.INT4  # how the upstream stores its quantized weights (requant.formats.source)


PROFILES = {
    # Every profile has K2.6's real MLA sizes (kv_lora_rank 512, rope 64, nope 128, v 128): engines' MLA
    # kernels take kv_lora_rank + qk_rope_head_dim = 576 only. Widths, heads, experts and vocab stay small.
    "tiny": Profile(layers=3, hidden=128, intermediate=256, moe_intermediate=64, experts=8, top_k=2, heads=4,
                    q_lora_rank=64, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, vocab=1024,
                    vision_hidden=64, vision_blocks=1, shards=4),
    # The model `make train-model` trains (requant/testing/trained): K2.6's topology in miniature, weights shipped.
    "trained": Profile(layers=3, hidden=128, intermediate=256, moe_intermediate=64, experts=8, top_k=2, heads=2,
                       q_lora_rank=64, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, vocab=512,
                       vision_hidden=64, vision_blocks=1, shards=4),
    "k26-topology": Profile(layers=61, hidden=64, intermediate=128, moe_intermediate=32, experts=384, top_k=8, heads=2,
                            q_lora_rank=32, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, vocab=1024,
                            vision_hidden=32, vision_blocks=2, shards=16),
    # K2.6's real widths for benchmarks (make bench-layer): layer 0 dense (intermediate 18432), one MoE layer of
    # 384 routed experts 2048x7168 INT4 + the shared expert, real MLA with 64 heads; ~10.8 GB. The vocabulary
    # stays small: embeddings and head are plain copies, and at 163840 entries they would add 4.7 GB that a
    # benchmark on tmpfs cannot hold twice. ``synth --experts N`` keeps N experts for smaller runs.
    "k26-layer": Profile(layers=2, hidden=7168, intermediate=18432, moe_intermediate=2048, experts=384, top_k=8,
                         heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128,
                         vocab=1024, vision_hidden=64, vision_blocks=1, shards=4, random_codes=True),
}
# The whole of K2.6 at its real sizes (61 layers, 384 experts, vocabulary 163840, 64 shards; the vision tower stays
# small), for planning only: ``synth --layout-only`` writes its headers over holes, and a plan of it has the real
# model's jobs and bytes (``requant bench cluster``).
PROFILES["k26"] = replace(PROFILES["k26-layer"], layers=61, vocab=163840, shards=64)
# The family's other releases at tiny's sizes: DeepSeek-V3 (FP8 blocks, one MTP layer), Kimi-K2-Instruct (FP8 blocks,
# text-only), an MXFP4 release of K2.6's layout (quantization-aware-trained experts), NVFP4 ones (llm-compressor's
# NVFP4A16; NVIDIA's Model Optimizer NVFP4, activation scales included) and a BF16 fine-tune of it.
# ``synth --source`` stores any profile in another source format.
PROFILES |= {
    "deepseek-v3": replace(PROFILES["tiny"], architecture="deepseek-v3", source=SourceFormat.FP8_BLOCK),
    "kimi-k2-instruct": replace(PROFILES["tiny"], architecture="kimi-k2", source=SourceFormat.FP8_BLOCK),
    "kimi-mxfp4": replace(PROFILES["tiny"], source=SourceFormat.MXFP4),
    "kimi-nvfp4": replace(PROFILES["tiny"], source=SourceFormat.NVFP4),
    "kimi-nvfp4-modelopt": replace(PROFILES["tiny"], source=SourceFormat.NVFP4_MODELOPT),
    "kimi-bf16": replace(PROFILES["tiny"], source=SourceFormat.BF16),
}


# The releases a profile's layout and config copy: the VLM wrapper with its vision tower (Kimi-K2.5/K2.6), and the
# text-only DeepseekV3 checkpoints (DeepSeek-V3/R1 with one MTP layer; Kimi-K2-Instruct without, with the rotary
# embedding's inv_freq buffers stored in every layer).
ARCHITECTURES = ("kimi-k25", "deepseek-v3", "kimi-k2")
MTP_LAYERS = {"deepseek-v3": 1}
MODEL_TYPES = {"kimi-k25": "kimi_k2", "deepseek-v3": "deepseek_v3", "kimi-k2": "kimi_k2"}


def quantization_config(p: Profile) -> dict | None:
    """The ``quantization_config`` a release in ``p.source`` carries (as its publisher writes it; None for BF16)."""
    if p.source is SourceFormat.FP8_BLOCK:
        return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    if p.source is SourceFormat.BF16:
        return None
    ignore = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*",
              "re:.*mlp\\.gate$", "re:vision_tower.*", "re:mm_projector.*"]
    if p.source is SourceFormat.NVFP4_MODELOPT:  # Model Optimizer's NVFP4 (W4A4) for the routed experts, as NVIDIA's
        # releases carry it in config.json
        nvfp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP}
        return {"config_groups": {"group_0": {"input_activations": dict(nvfp4), "weights": dict(nvfp4),
                                              "targets": ["Linear"]}},
                "ignore": ["language_model.lm_head", "language_model.model.embed_tokens", "*self_attn*", "*mlp.gate",
                           "*shared_experts*", "language_model.model.layers.0*", "mm_projector*", "vision_tower*"],
                "quant_algo": "NVFP4", "producer": {"name": "modelopt", "version": "0.47.0"}, "quant_method": "modelopt"}
    if p.source in (SourceFormat.MXFP4, SourceFormat.NVFP4):  # llm-compressor's MXFP4A16 / NVFP4A16 schemes, routed
        # experts only (its Kimi examples)
        mx = p.source is SourceFormat.MXFP4
        group, fmt = ("MXFP4A16", "mxfp4-pack-quantized") if mx else ("NVFP4A16", "nvfp4-pack-quantized")
        weights = {"actorder": None, "block_structure": None, "dynamic": False,
                   "group_size": MX_BLOCK_SIZE if mx else NVFP4_GROUP, "num_bits": 4, "observer": None,
                   "observer_kwargs": {}, "scale_dtype": "torch.uint8" if mx else "torch.float8_e4m3fn",
                   "strategy": "group" if mx else "tensor_group", "symmetric": True, "type": "float", "zp_dtype": None}
        return {"config_groups": {group: {"format": fmt, "input_activations": None,
                                          "output_activations": None, "targets": ["Linear"], "weights": weights}},
                "format": fmt, "global_compression_ratio": None, "ignore": ignore,
                "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
                "transform_config": {}, "version": "0.19.0"}
    return {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None, "block_structure": None, "dynamic": False, "group_size": INT4_GROUP_SIZE,
                    "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                    "symmetric": True, "type": "int",
                },
            }
        },
        "format": "pack-quantized",
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def text_config(p: Profile, bos: int, eos: int) -> dict:
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate,
        "kv_lora_rank": p.kv_lora_rank,
        "max_position_embeddings": 262144,
        "model_type": "kimi_k2",
        "moe_intermediate_size": p.moe_intermediate,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": p.experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": p.heads,
        "num_experts_per_tok": p.top_k,
        "num_hidden_layers": p.layers,
        "num_key_value_heads": p.heads,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": p.q_lora_rank,
        "qk_nope_head_dim": p.qk_nope,
        "qk_rope_head_dim": p.qk_rope,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn",
        },
        "rope_theta": 50000.0,
        "routed_scaling_factor": 2.827,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "v_head_dim": p.v_head,
        "vocab_size": p.vocab,
    }
    config["model_type"] = MODEL_TYPES[p.architecture]
    config["num_nextn_predict_layers"] = MTP_LAYERS.get(p.architecture, 0)
    if (quant := quantization_config(p)) is not None:
        config["quantization_config"] = quant
    return config


def model_config(p: Profile, bos: int, eos: int, pad: int, media: int) -> dict:
    config = _wrapper_config(p, bos, eos, pad, media)
    if p.source is SourceFormat.NVFP4_MODELOPT:  # Model Optimizer's export writes it at the top
        config["quantization_config"] = config["text_config"].pop("quantization_config")
    return config


def _wrapper_config(p: Profile, bos: int, eos: int, pad: int, media: int) -> dict:
    return {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "auto_map": {
            "AutoConfig": "configuration_kimi_k25.KimiK25Config",
            "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
        },
        "bos_token_id": bos,
        "eos_token_id": eos,
        "ignore_index": -100,
        "image_token_id": media,
        "media_placeholder_token_id": media,
        "model_type": "kimi_k25",
        "pad_token_id": pad,
        "text_config": text_config(p, bos, eos),
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.56.2",
        "use_unified_vision_chunk": True,
        # the keys transformers' Kimi_K25VisionConfig (which vLLM uses) reads; a key it ignores would leave
        # its default, e.g. a 27-block vision tower, in an engine
        "projection_hidden_size": p.vision_hidden,
        "projection_layer_norm_eps": 1e-05,
        "vision_config": vision_config(p),
    }


def vision_config(p: Profile) -> dict:
    return {"model_type": "kimi_k25_vision", "patch_size": VISION_PATCH, "pos_emb_height": 64, "pos_emb_width": 64,
            "pos_emb_time": 4, "num_attention_heads": VISION_HEADS, "num_hidden_layers": p.vision_blocks,
            "hidden_size": p.vision_hidden, "intermediate_size": 2 * p.vision_hidden, "hidden_act": "gelu_pytorch_tanh",
            "merge_kernel_size": [2, 2]}


def preprocessor_config() -> dict:
    """The image processor settings the real repository ships (vLLM's Kimi-K2.5/K2.6 model loads them even
    for text-only serving)."""
    return {"media_proc_cfg": {"patch_size": VISION_PATCH, "merge_kernel_size": 2, "temporal_merge_kernel_size": 4,
                               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "in_patch_limit": 16384,
                               "patch_limit_on_one_side": 512, "fixed_output_tokens": None,
                               "in_patch_limit_each_frame": 4096, "in_patch_limit_video": None, "sample_fps": 2.0,
                               "max_num_frames_each_video": None, "timestamp_mode": "hh:mm:ss.fff"}}


class _Weights:
    """Deterministic tensors from one seeded generator (numpy's for the fast random-code experts)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def linear(self, out: int, inp: int) -> torch.Tensor:
        return (torch.randn(out, inp, generator=self.gen) / inp**0.5).to(torch.bfloat16)

    def norm(self, n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=self.gen)).to(torch.bfloat16)

    def int4_experts(self, count: int, out: int, inp: int) -> list[dict[str, torch.Tensor]]:
        """``count`` INT4 expert matrices: symmetric group-32 min-max quantization of N(0, 1/inp) weights."""
        w = torch.randn(count * out, inp, generator=self.gen) / inp**0.5
        return int4_quantize(w.reshape(count, out, inp))

    def experts(self, source: SourceFormat, count: int, out: int, inp: int) -> list[dict[str, torch.Tensor]]:
        """``count`` expert matrices of N(0, 1/inp) weights in ``source``'s format, one dict of tensors each."""
        if source is SourceFormat.INT4:
            return self.int4_experts(count, out, inp)
        w = (torch.randn(count * out, inp, generator=self.gen) / inp**0.5).to(torch.bfloat16).reshape(count, out, inp)
        if source is SourceFormat.FP8_BLOCK:
            return [dict(zip(("weight", "weight_scale_inv"), fp8_block_quantize(m))) for m in w]
        if source is SourceFormat.MXFP4:
            return [dict(zip(("weight_packed", "weight_scale"), quantize_mxfp4_ct(m))) for m in w]
        if source is SourceFormat.NVFP4:
            return [dict(zip(MODULE_PARAMS["nvfp4"], quantize_nvfp4(m))) for m in w]
        if source is SourceFormat.NVFP4_MODELOPT:
            return [_modelopt_nvfp4(m) for m in w]
        return [{"weight": m.clone()} for m in w]

    def random_expert(self, source: SourceFormat, out: int, inp: int) -> dict[str, torch.Tensor]:
        """One expert matrix with random codes in ``source``'s format (see :meth:`int4_random_codes`)."""
        if source is SourceFormat.INT4:
            return self.int4_random_codes(out, inp)
        if source is SourceFormat.FP8_BLOCK:
            return dict(zip(("weight", "weight_scale_inv"), self.fp8_random(out, inp)))
        if source is SourceFormat.MXFP4:
            packed = torch.from_numpy(np.frombuffer(self.rng.bytes(out * inp // 2), dtype=np.uint8).reshape(out, inp // 2).copy())
            exponent = np.clip(np.rint(-8 + self.rng.standard_normal((out, inp // MX_BLOCK_SIZE))), -20, 0).astype(np.int16)
            return {"weight_packed": packed, "weight_scale": torch.from_numpy((exponent + 127).astype(np.uint8))}
        if source is SourceFormat.NVFP4:
            packed = torch.from_numpy(np.frombuffer(self.rng.bytes(out * inp // 2), dtype=np.uint8).reshape(out, inp // 2).copy())
            scale = np.minimum(np.abs(1 + 0.3 * self.rng.standard_normal((out, inp // NVFP4_GROUP), dtype=np.float32)) * 200,
                               FP8_E4M3_MAX)
            return {"weight_packed": packed, "weight_scale": torch.from_numpy(scale).to(torch.float8_e4m3fn),
                    "weight_global_scale": torch.tensor([FP8_E4M3_MAX * 6 * inp**0.5 / 3], dtype=torch.float32)}
        if source is SourceFormat.NVFP4_MODELOPT:
            ct = self.random_expert(SourceFormat.NVFP4, out, inp)
            return {"weight": ct["weight_packed"], "weight_scale": ct["weight_scale"],
                    "weight_scale_2": ct["weight_global_scale"].reciprocal().reshape(()), "input_scale": MODELOPT_INPUT_SCALE}
        return {"weight": self.linear(out, inp)}

    def fp8_random(self, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random E4M3 codes (NaN codes replaced) and block scales like DeepSeek's: valid FP8-block data fast."""
        codes = np.frombuffer(self.rng.bytes(out * inp), dtype=np.uint8).reshape(out, inp).copy()
        codes[(codes & 0x7F) == 0x7F] ^= 0x01  # 0x7F/0xFF are NaN: make them 0x7E/0xFE (+-448)
        rows, cols = block_grid((out, inp), FP8_BLOCK_DEFAULT)
        scale = np.abs(1 + 0.2 * self.rng.standard_normal((rows, cols), dtype=np.float32)) * 3.0 / inp**0.5 / FP8_E4M3_MAX
        return torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scale)

    def int4_random_codes(self, out: int, inp: int) -> dict[str, torch.Tensor]:
        """One INT4 expert matrix with uniformly random codes (every nibble -8..7) and group scales distributed
        like the min-max scales of N(0, 1/inp) weights: valid pack-quantized data at a few GB/s, where drawing
        and quantizing Gaussians takes ~0.5 s per 2048x7168 matrix. A converter's work does not depend on
        the values, so real-width benchmarks use it (``random_codes`` profiles)."""
        groups = -(-inp // INT4_GROUP_SIZE)
        packed = torch.from_numpy(np.frombuffer(self.rng.bytes(out * inp // 2), dtype=np.int32).reshape(out, inp // 8).copy())
        amax = np.clip(2.3 + 0.35 * self.rng.standard_normal((out, groups), dtype=np.float32), 1.0, None) / inp**0.5
        scale = torch.from_numpy(amax / ((INT4_MAX - INT4_MIN) / 2)).to(torch.bfloat16)
        return {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([out, inp], dtype=torch.int32)}


def _int4_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and BF16 scales of float weights ``[..., in]``: symmetric min-max per group of 32 inputs, as
    compressed-tensors' pack-quantized INT4 (a partial last group gets its own scale). Returns codes
    ``[..., groups, 32]`` (float) and scales ``[..., groups, 1]`` (float holding BF16 values)."""
    *lead, inp = w.shape
    groups = -(-inp // INT4_GROUP_SIZE)
    w = torch.nn.functional.pad(w.float(), (0, groups * INT4_GROUP_SIZE - inp)).reshape(*lead, groups, INT4_GROUP_SIZE)
    scale = (w.abs().amax(dim=-1, keepdim=True) / ((INT4_MAX - INT4_MIN) / 2)).to(torch.bfloat16).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: any scale decodes to 0
    return torch.round(w / scale).clamp(INT4_MIN, INT4_MAX), scale


def int4_fake_quantize(w: torch.Tensor) -> torch.Tensor:
    """What :func:`int4_quantize` stores for ``w`` (``[..., in]``), decoded back to float; the gradient passes
    straight through (``make train-model`` trains the routed experts through it, as Moonshot trains K2.6
    for its INT4 release). Quantizes the BF16 rounding of ``w``, which is what the checkpoint keeps, and rounds
    the decoded weight to BF16 as compressed-tensors' decompression does."""
    master = w.to(torch.bfloat16)
    codes, scale = _int4_grid(master)
    decoded = (codes * scale).flatten(-2)[..., : w.shape[-1]].to(torch.bfloat16).float()  # as dequantized to BF16
    return w + (decoded - w).detach()


def int4_quantize(w: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """compressed-tensors' pack-quantized INT4 of float weights ``[count, out, in]``: symmetric min-max scales per
    group of 32 inputs (BF16), codes packed by compressed-tensors' own ``pack_to_int32``; one dict per matrix."""
    count, out, inp = w.shape
    codes, scale = _int4_grid(w)
    q = codes.to(torch.int8).reshape(count * out, -1)[:, :inp]
    packed = pack_to_int32(q, num_bits=4).reshape(count, out, -1)
    scale = scale.to(torch.bfloat16).reshape(count, out, -1)
    shape = torch.tensor([out, inp], dtype=torch.int32)
    return [{"weight_packed": packed[e].clone(), "weight_scale": scale[e].clone(), "weight_shape": shape.clone()}
            for e in range(count)]


@dataclass(frozen=True)
class _Lazy:
    """A tensor of the checkpoint before it exists: name, dtype and shape decide the shards; ``make`` draws it
    (in stream order, so the generator's draws and hence the bytes do not depend on how it is written)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


BF16, F32 = torch.bfloat16, torch.float32


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK_DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's FP8 block quantization of float weights [out, in]: per block (edges partial), the FP32 scale
    amax / 448 and the weights divided by it, cast to E4M3 (an all-zero block gets scale 1)."""
    out, inp = w.shape
    bo, bi = block
    rows, cols = -(-out // bo), -(-inp // bi)
    padded = torch.nn.functional.pad(w.float(), (0, cols * bi - inp, 0, rows * bo - out))
    blocks = padded.view(rows, bo, cols, bi)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_E4M3_MAX)
    q = (blocks / scale.view(rows, 1, cols, 1)).view(rows * bo, cols * bi)[:out, :inp].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def _tensors(p: Profile, w: _Weights) -> Iterator[_Lazy]:
    """The checkpoint's tensors in order (embeddings, layers in order, final norm and head, vision), unmade."""
    prefix = VLM_TEXT_PREFIX if p.architecture == "kimi-k25" else ""
    lm = f"{prefix}model"
    fp8 = p.source is SourceFormat.FP8_BLOCK

    def linear(name: str, out: int, inp: int, quantized: bool = True) -> Iterator[_Lazy]:
        """A Linear weight (``name`` ends in .weight); FP8-block upstreams store the decoder layers' as FP8."""
        if not (fp8 and quantized):
            yield _Lazy(name, BF16, (out, inp), lambda: w.linear(out, inp))
            return
        drawn: dict = {}

        def part(i: int) -> torch.Tensor:
            if not drawn:
                drawn["q"] = w.fp8_random(out, inp) if p.random_codes else fp8_block_quantize(w.linear(out, inp))
            return drawn["q"][i]

        yield _Lazy(name, torch.float8_e4m3fn, (out, inp), partial(part, 0))
        yield _Lazy(f"{name}_scale_inv", F32, block_grid((out, inp), FP8_BLOCK_DEFAULT), partial(part, 1))

    def norm(name: str, n: int) -> _Lazy:
        return _Lazy(name, BF16, (n,), lambda: w.norm(n))

    def zeros(name: str, n: int) -> _Lazy:
        return _Lazy(name, BF16, (n,), lambda: torch.zeros(n, dtype=BF16))

    def mlp(base: str, inter: int) -> Iterator[_Lazy]:
        yield from linear(f"{base}.gate_proj.weight", inter, p.hidden)
        yield from linear(f"{base}.up_proj.weight", inter, p.hidden)
        yield from linear(f"{base}.down_proj.weight", p.hidden, inter)

    yield from linear(f"{lm}.embed_tokens.weight", p.vocab, p.hidden, quantized=False)
    for i in range(p.layers + MTP_LAYERS.get(p.architecture, 0)):
        L = f"{lm}.layers.{i}"
        a = f"{L}.self_attn"
        if i >= p.layers:  # DeepSeek-V3's multi-token-prediction layer: BF16 head parts, then a decoder block
            yield from linear(f"{L}.embed_tokens.weight", p.vocab, p.hidden, quantized=False)
            yield norm(f"{L}.enorm.weight", p.hidden)
            yield norm(f"{L}.hnorm.weight", p.hidden)
            yield from linear(f"{L}.eh_proj.weight", p.hidden, 2 * p.hidden, quantized=False)
            yield norm(f"{L}.shared_head.norm.weight", p.hidden)
            yield from linear(f"{L}.shared_head.head.weight", p.vocab, p.hidden, quantized=False)
        yield norm(f"{L}.input_layernorm.weight", p.hidden)
        yield norm(f"{L}.post_attention_layernorm.weight", p.hidden)
        yield from linear(f"{a}.q_a_proj.weight", p.q_lora_rank, p.hidden)
        yield norm(f"{a}.q_a_layernorm.weight", p.q_lora_rank)
        yield from linear(f"{a}.q_b_proj.weight", p.heads * (p.qk_nope + p.qk_rope), p.q_lora_rank)
        yield from linear(f"{a}.kv_a_proj_with_mqa.weight", p.kv_lora_rank + p.qk_rope, p.hidden)
        yield norm(f"{a}.kv_a_layernorm.weight", p.kv_lora_rank)
        yield from linear(f"{a}.kv_b_proj.weight", p.heads * (p.qk_nope + p.v_head), p.kv_lora_rank)
        yield from linear(f"{a}.o_proj.weight", p.hidden, p.heads * p.v_head)
        if p.architecture == "kimi-k2":  # Kimi-K2-Instruct ships the rotary embedding's buffer in every layer
            yield _Lazy(f"{a}.rotary_emb.inv_freq", BF16, (p.qk_rope // 2,), partial(_inv_freq, p.qk_rope))
        if i == 0:
            yield from mlp(f"{L}.mlp", p.intermediate)
            continue
        yield _Lazy(f"{L}.mlp.gate.weight", BF16, (p.experts, p.hidden),
                    lambda: (0.02 * torch.randn(p.experts, p.hidden, generator=w.gen)).to(BF16))
        yield _Lazy(f"{L}.mlp.gate.e_score_correction_bias", F32, (p.experts,),
                    lambda: 0.01 * torch.randn(p.experts, generator=w.gen))
        yield from mlp(f"{L}.mlp.shared_experts", p.moe_intermediate)
        yield from _experts(f"{L}.mlp.experts", p, w)
    yield norm(f"{lm}.norm.weight", p.hidden)
    yield from linear(f"{prefix}lm_head.weight", p.vocab, p.hidden, quantized=False)
    if p.architecture != "kimi-k25":
        return
    v, vi = p.vision_hidden, 2 * p.vision_hidden
    yield _Lazy("vision_tower.patch_embed.proj.weight", BF16, (v, 3, VISION_PATCH, VISION_PATCH),
                lambda: (0.02 * torch.randn(v, 3, VISION_PATCH, VISION_PATCH, generator=w.gen)).to(BF16))
    yield zeros("vision_tower.patch_embed.proj.bias", v)
    for b in range(p.vision_blocks):
        B = f"vision_tower.encoder.blocks.{b}"
        yield norm(f"{B}.norm0.weight", v)
        yield zeros(f"{B}.norm0.bias", v)
        yield from linear(f"{B}.wqkv.weight", 3 * v, v, quantized=False)
        yield zeros(f"{B}.wqkv.bias", 3 * v)
        yield from linear(f"{B}.wo.weight", v, v, quantized=False)
        yield norm(f"{B}.norm1.weight", v)
        yield from linear(f"{B}.mlp.fc0.weight", vi, v, quantized=False)
        yield from linear(f"{B}.mlp.fc1.weight", v, vi, quantized=False)
    yield norm("vision_tower.encoder.final_layernorm.weight", v)
    yield norm("mm_projector.pre_norm.weight", v)
    yield from linear("mm_projector.proj.0.weight", 4 * v, 4 * v, quantized=False)
    yield zeros("mm_projector.proj.0.bias", 4 * v)
    yield from linear("mm_projector.proj.2.weight", p.hidden, 4 * v, quantized=False)
    yield zeros("mm_projector.proj.2.bias", p.hidden)


def _inv_freq(rope_dim: int) -> torch.Tensor:
    return (1.0 / 50000.0 ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)).to(BF16)


# A Model Optimizer NVFP4 (W4A4) release's activation scale, the same for every module here (requant leaves it behind)
MODELOPT_INPUT_SCALE = torch.tensor(0.0625, dtype=torch.float32)


def _modelopt_nvfp4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One matrix as Model Optimizer's NVFP4 (W4A4) stores it: its weights, and an activation scale."""
    return {**dict(zip(MODULE_PARAMS["nvfp4_modelopt"], quantize_nvfp4_modelopt(weight))),
            "input_scale": MODELOPT_INPUT_SCALE.clone()}


# The tensors of one routed expert projection, by source format: (name, dtype, shape from (out, in)).
EXPERT_PARAMS = {
    SourceFormat.INT4: (("weight_packed", torch.int32, lambda o, i: (o, -(-i // 8))),
                        ("weight_scale", BF16, lambda o, i: (o, -(-i // INT4_GROUP_SIZE))),
                        ("weight_shape", torch.int32, lambda o, i: (2,))),
    SourceFormat.FP8_BLOCK: (("weight", torch.float8_e4m3fn, lambda o, i: (o, i)),
                             ("weight_scale_inv", F32, lambda o, i: block_grid((o, i), FP8_BLOCK_DEFAULT))),
    SourceFormat.MXFP4: (("weight_packed", torch.uint8, lambda o, i: (o, i // 2)),
                         ("weight_scale", torch.uint8, lambda o, i: (o, i // MX_BLOCK_SIZE))),
    SourceFormat.NVFP4: (("weight_packed", torch.uint8, lambda o, i: (o, i // 2)),
                         ("weight_scale", torch.float8_e4m3fn, lambda o, i: (o, i // NVFP4_GROUP)),
                         ("weight_global_scale", F32, lambda o, i: (1,))),
    SourceFormat.NVFP4_MODELOPT: (("weight", torch.uint8, lambda o, i: (o, i // 2)),
                                  ("weight_scale", torch.float8_e4m3fn, lambda o, i: (o, i // NVFP4_GROUP)),
                                  ("weight_scale_2", F32, lambda o, i: ()), ("input_scale", F32, lambda o, i: ())),
    SourceFormat.BF16: (("weight", BF16, lambda o, i: (o, i)),),
}


def _experts(base: str, p: Profile, w: _Weights) -> Iterator[_Lazy]:
    """One MoE layer's routed experts, expert by expert (gate, up, down; each projection's tensors in its source
    format). Gaussian profiles draw each projection for all experts at once, when the first is made;
    ``random_codes`` profiles draw one matrix at a time, so a real-width layer never sits in memory."""
    shapes = {"gate_proj": (p.moe_intermediate, p.hidden), "up_proj": (p.moe_intermediate, p.hidden),
              "down_proj": (p.hidden, p.moe_intermediate)}
    drawn: dict = {}

    def part(e: int, proj: str, param: str) -> torch.Tensor:
        if p.random_codes:
            if drawn.get("key") != (e, proj):
                drawn.update(key=(e, proj), mat=w.random_expert(p.source, *shapes[proj]))
            return drawn["mat"][param]
        if not drawn:
            drawn.update({name: w.experts(p.source, p.experts, *shape) for name, shape in shapes.items()})
        return drawn[proj][e][param]

    for e in range(p.experts):
        for proj, (out, inp) in shapes.items():
            for param, dtype, shape in EXPERT_PARAMS[p.source]:
                yield _Lazy(f"{base}.{e}.{proj}.{param}", dtype, shape(out, inp), partial(part, e, proj, param))


LICENSE_TEXT = """Synthetic test checkpoint generated by requant.

The tensors in this directory are random numbers with the layout of Moonshot AI's Kimi-K2.6; they
carry no trained weights. The file exists so that tools copy license files through verbatim.
"""

REMOTE_CODE_STUB = '''# Stand-in for the upstream repository's remote code (configuration_kimi_k25.py).
# requant copies files like this byte for byte and never imports or executes them.
raise RuntimeError("remote code must never be executed by requant")
'''


TRAINED_LICENSE_TEXT = """Synthetic test checkpoint generated by requant.

The language model's weights were trained by requant (`make train-model`) on generated arithmetic word
problems, its routed experts through INT4 as Moonshot trains Kimi-K2.6 for its INT4 release, and
published here as {source}. The vision tower and projector are random numbers. The file exists so that tools copy license files through verbatim.
"""


def trained_assets() -> Path:
    """requant/testing/trained/assets, every file checked against its SHA256SUMS (a changed file fails with its name)."""
    from requant.testing.trained import ASSET_FILES, ASSETS

    check_sums(ASSETS, ASSET_FILES, "trained model's assets", "restore it from git (or rerun make train-model)")
    return ASSETS


_QUANTIZED_PARAMS = {p for kind, params in MODULE_PARAMS.items() if kind != "dense" for p in params} - {"weight"}


def _with_trained_weights(tensors: Iterator[_Lazy], root: Path, source: SourceFormat) -> Iterator[_Lazy]:
    """The stream of ``_tensors`` with every language-model tensor replaced by the trained one, the modules the
    ``source`` format quantizes quantized from the trained weights (INT4: the routed experts, the grid they were
    trained on; FP8 blocks: every decoder Linear; MXFP4: the routed experts); vision tower and projector stay as
    generated."""
    from safetensors.torch import load_file

    trained = load_file(str(root / "model.safetensors"))
    stored: dict[str, dict[str, torch.Tensor]] = {}

    def quantized(module: str, param: str) -> torch.Tensor:
        if module not in stored:
            w = trained[f"{module}.weight"]
            if source is SourceFormat.INT4:
                stored[module] = int4_quantize(w.unsqueeze(0))[0]
            elif source is SourceFormat.FP8_BLOCK:
                stored[module] = dict(zip(MODULE_PARAMS["fp8_block"], fp8_block_quantize(w)))
            elif source is SourceFormat.NVFP4:
                stored[module] = dict(zip(MODULE_PARAMS["nvfp4"], quantize_nvfp4(w)))
            elif source is SourceFormat.NVFP4_MODELOPT:
                stored[module] = _modelopt_nvfp4(w)
            else:
                stored[module] = dict(zip(MODULE_PARAMS["mxfp4"], quantize_mxfp4_ct(w)))
        return stored[module][param]

    def drawn_then(lazy: _Lazy, make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        # draw what the generated tensor would have, so the vision tower's draws (after) do not move
        return lambda: (lazy.make(), make())[1]

    for lazy in tensors:
        if not lazy.name.startswith(VLM_TEXT_PREFIX):
            yield lazy
            continue
        local = lazy.name.removeprefix(VLM_TEXT_PREFIX)
        module, _, param = local.rpartition(".")
        if param in _QUANTIZED_PARAMS or lazy.dtype == torch.float8_e4m3fn:  # a quantized module's stored tensors
            yield replace(lazy, make=drawn_then(lazy, partial(quantized, module, param)))
            continue
        value = trained[local]
        if tuple(value.shape) != lazy.shape:
            raise RequantError(f"{root}/model.safetensors: {local}: shape {list(value.shape)}, the trained profile "
                               f"expects {list(lazy.shape)}")
        yield replace(lazy, make=drawn_then(lazy, partial(value.to, lazy.dtype)))


def _write_shard(path: Path, group: list[_Lazy], bar: tqdm, layout_only: bool = False) -> None:
    """One shard, one tensor in memory at a time: the header is known from the shapes, each tensor is made in
    stream order and written at its offset (the same bytes as safetensors' save_file). ``layout_only``: the header
    alone, the data a hole of its size (a sparse file: no disk used, zeros if read)."""
    specs = [TensorSpec(t.name, TORCH_TO_NAME[t.dtype], t.shape) for t in group]
    if layout_only:
        head, _ = file_head(specs)
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(len(head) + sum(spec.nbytes for spec in specs))
        bar.update(sum(t.nbytes for t in group))
        return
    writer = SafetensorsWriter(path, specs)
    try:
        for lazy in group:
            tensor = lazy.make()
            if tensor.dtype != lazy.dtype or tuple(tensor.shape) != lazy.shape:
                raise AssertionError(f"{lazy.name}: made {tensor.dtype}{tuple(tensor.shape)}, planned {lazy.dtype}{lazy.shape}")
            writer.write(lazy.name, tensor)
            bar.update(lazy.nbytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def synthesize(dst: str | Path, profile: str | Profile = "tiny", seed: int = 0, progress: bool = True,
               experts: int | None = None, source: SourceFormat | str | None = None, layout_only: bool = False) -> Path:
    """Write a synthetic upstream into ``dst``; ``profile`` is a name from PROFILES or a Profile; ``experts``
    replaces its routed expert count, ``source`` its source format; ``layout_only``: every file but the shards'
    data, which are holes (sparse files of the right sizes: enough to plan a conversion, e.g. the ``k26`` profile's
    600 GB, not to run one). The ``trained`` profile takes its language model and tokenizer from
    requant/testing/trained/assets. Tensors are made and written one at a time: memory stays at the largest tensor."""
    if isinstance(profile, Profile):
        p, profile = profile, "custom"
    elif profile in PROFILES:
        p = PROFILES[profile]
    else:
        raise RequantError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    if experts is not None:
        if profile == "trained":
            raise RequantError("--experts: the trained profile's experts are the trained model's (8)")
        if not p.top_k <= experts:
            raise RequantError(f"--experts {experts}: needs at least top_k = {p.top_k} routed experts")
        p = replace(p, experts=experts)
    if source is not None:
        p = replace(p, source=SourceFormat(source))
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise RequantError(f"{dst}: exists and is not empty")
    root = trained_assets() if profile == "trained" else None  # before anything is written
    dst.mkdir(parents=True, exist_ok=True)
    stream = _tensors(p, _Weights(seed))
    if root is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(root / name, dst / name)
        vocab = json.loads((root / "tokenizer.json").read_text())["model"]["vocab"]
        ids = {t: vocab[t] for t in SPECIAL_TOKENS}
        stream = _with_trained_weights(stream, root, p.source)
    else:
        ids = write_tokenizer(dst, vocab_size=p.vocab, seed=seed)
    tensors = list(stream)
    total = sum(t.nbytes for t in tensors)
    budget = -(-total // p.shards)
    shards: list[list[_Lazy]] = [[]]
    used = 0
    for lazy in tensors:
        # cut between modules (never inside an INT4 triple), as save_pretrained's shards fall
        module_changes = not shards[-1] or shards[-1][-1].name.rsplit(".", 1)[0] != lazy.name.rsplit(".", 1)[0]
        if used >= budget * len(shards) and len(shards) < p.shards and module_changes:
            shards.append([])
        shards[-1].append(lazy)
        used += lazy.nbytes
    weight_map = {}
    with tqdm(total=total, desc=f"synth {profile}", unit="B", unit_scale=True, disable=not progress) as bar:
        for i, group in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):06d}.safetensors"
            _write_shard(dst / file, group, bar, layout_only)
            weight_map.update({lazy.name: file for lazy in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if p.architecture == "kimi-k25":
        config = model_config(p, ids["[BOS]"], ids["[EOS]"], ids["[PAD]"], ids["<|media_pad|>"])
    else:
        config = {**text_config(p, ids["[BOS]"], ids["[EOS]"]),
                  "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                               "AutoModel": "modeling_deepseek.DeepseekV3Model",
                               "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if p.source is SourceFormat.NVFP4_MODELOPT:  # Model Optimizer's own description beside it
        quant = quantization_config(p)
        hf_quant = {"producer": quant["producer"], "quantization": {
            "quant_algo": quant["quant_algo"], "kv_cache_quant_algo": None, "group_size": NVFP4_GROUP,
            "exclude_modules": quant["ignore"]}}
        (dst / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=4))
    # one EOS everywhere: engines stop generation on generation_config's, the reference server on config's
    generation = {"bos_token_id": ids["[BOS]"], "eos_token_id": ids["[EOS]"], "max_length": 262144, "do_sample": True,
                  "temperature": 1.0, "top_p": 0.95}
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if p.architecture == "kimi-k25":
        (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    (dst / "LICENSE").write_text(TRAINED_LICENSE_TEXT.format(source=p.source.description) if profile == "trained"
                                 else LICENSE_TEXT)
    remote_code = "configuration_kimi_k25.py" if p.architecture == "kimi-k25" else "configuration_deepseek.py"
    (dst / remote_code).write_text(REMOTE_CODE_STUB.replace("configuration_kimi_k25.py", remote_code))
    kind = f"Trained language model, published as {p.source.value}, random vision tower" if profile == "trained" else \
        f"Random weights, quantized upstream as {p.source.value} ({p.source.description})"
    layout = {"kimi-k25": "Kimi-K2.6", "deepseek-v3": "DeepSeek-V3", "kimi-k2": "Kimi-K2-Instruct"}[p.architecture]
    (dst / "README.md").write_text(f"# Synthetic {layout} layout ({profile}, seed {seed})\n\n{kind}; see LICENSE.\n")
    return dst

