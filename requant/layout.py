"""What a Kimi-K2.6 / DeepseekV3-family checkpoint must contain, derived from its config.json.

Nothing here is hard-coded to K2.6's sizes: every shape comes from the config, so the same code
checks the real 61-layer model and the small synthetic ones.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from typing import Any

from requant.errors import CheckpointError

# Architectures whose text part is DeepseekV3 with MLA and sigmoid/noaux_tc MoE routing.
# KimiK25 is the VLM wrapper (text under ``language_model.``); the others are text-only.
VLM_ARCHITECTURES = {"KimiK25ForConditionalGeneration"}
TEXT_ARCHITECTURES = {"DeepseekV3ForCausalLM", "KimiK2ForCausalLM"}
VLM_TEXT_PREFIX = "language_model."

# Tensor classes a recipe maps to targets. Patterns are fnmatch on module names (the tensor name
# without its last component), checked in order; the first match wins.
CLASS_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vision_tower", ("vision_tower.*",)),
    ("mm_projector", ("mm_projector.*",)),
    ("routed_expert", ("*.mlp.experts.*",)),
    ("shared_expert", ("*.mlp.shared_experts.*",)),
    ("router", ("*.mlp.gate",)),
    ("dense_mlp", ("*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj")),
    ("norm", ("*norm",)),
    ("attention", ("*.self_attn.*",)),
    ("embedding", ("*embed_tokens",)),
    ("lm_head", ("*lm_head", "*.shared_head.head")),  # the MTP layer's head is an LM head
    ("mtp_projection", ("*.eh_proj",)),
)
# Classes no recipe can quantize, whatever it says: vLLM and SGLang build the MTP layer's ``eh_proj`` as a plain
# unquantized Linear, so a quantized one cannot load (and an exclude list that misses it crashes vLLM).
ENGINE_UNQUANTIZED = ("mtp_projection",)
# The classes a recipe maps to targets (every one is required in a recipe file).
TENSOR_CLASSES = tuple(name for name, _ in CLASS_PATTERNS if name not in ENGINE_UNQUANTIZED)


# Modules vLLM loads into one fused layer with one quantization method (DeepseekV2/Kimi): the layer's name.
FUSED_LAYERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<base>.*\.self_attn)\.(q_a_proj|kv_a_proj_with_mqa)$"), "{base}.fused_qkv_a_proj"),
    (re.compile(r"^(?P<base>.*\.mlp\.experts)\.\d+\.(gate|up|down)_proj$"), "{base}"),
    (re.compile(r"^(?P<base>.*\.mlp\.shared_experts)\.(gate|up)_proj$"), "{base}.gate_up_proj"),
    (re.compile(r"^(?P<base>.*\.mlp)\.(gate|up)_proj$"), "{base}.gate_up_proj"),
)


def fused_layer(module: str) -> str | None:
    """The vLLM layer ``module`` is fused into, if any (e.g. q_a_proj -> ...self_attn.fused_qkv_a_proj)."""
    for pattern, name in FUSED_LAYERS:
        match = pattern.match(module)
        if match:
            return name.format(base=match.group("base"))
    return None


# Every class's patterns as one regular expression (a named group per class): one match per module name
# instead of a dozen fnmatch calls (a K2.6 plan classifies ~70k modules).
_CLASS_REGEX = re.compile("|".join(f"(?P<c{i}>{'|'.join(fnmatch.translate(p) for p in patterns)})"
                                   for i, (_, patterns) in enumerate(CLASS_PATTERNS)))


def classify(module: str) -> str | None:
    """The tensor class of ``module``: the first of ``CLASS_PATTERNS`` one of whose patterns matches."""
    match = _CLASS_REGEX.match(module)
    return CLASS_PATTERNS[int(match.lastgroup[1:])][0] if match else None


@dataclass(frozen=True)
class ModelConfig:
    """The parts of config.json the converter reads; ``raw`` is kept verbatim for the output."""

    raw: dict[str, Any]
    text: dict[str, Any]
    prefix: str  # "language_model." for the VLM wrapper, "" for text-only checkpoints
    quantization: dict[str, Any] | None  # upstream compressed-tensors config, if any

    @property
    def num_layers(self) -> int:
        return int(self.text["num_hidden_layers"])


def load_config(data: bytes, file: str = "config.json") -> ModelConfig:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(file, f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(file, "not a JSON object")
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise CheckpointError(file, f"expected one architecture name in 'architectures', got {str(archs)[:80]}")
    arch = archs[0]
    if arch in VLM_ARCHITECTURES:
        text, prefix = raw.get("text_config"), VLM_TEXT_PREFIX
        if not isinstance(text, dict):
            raise CheckpointError(file, f"{arch} needs a 'text_config' object")
    elif arch in TEXT_ARCHITECTURES:
        text, prefix = raw, ""
    else:
        supported = ", ".join(sorted(VLM_ARCHITECTURES | TEXT_ARCHITECTURES))
        raise CheckpointError(file, f"unknown architecture {arch!r}; supported: {supported}")
    quant = text.get("quantization_config") or raw.get("quantization_config")
    _check_text_config(text, file)
    return ModelConfig(raw=raw, text=text, prefix=prefix, quantization=quant)


_REQUIRED_INT = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "vocab_size", "first_k_dense_replace",
)


# Upper bounds far above any released model (K2.6: 61 layers, 384 experts, 64 heads, hidden 7168, vocab
# 163840). The planner enumerates modules from these numbers, so an absurd value in a corrupt or hostile
# config.json must be refused before it can size a loop or an allocation.
_COUNT_LIMITS = {"num_hidden_layers": 1024, "num_nextn_predict_layers": 16, "n_routed_experts": 1 << 16, "num_attention_heads": 1 << 12,
                 "first_k_dense_replace": 1024, "num_experts_per_tok": 1 << 10, "n_shared_experts": 64}
_SIZE_LIMIT = 1 << 22


def _check_text_config(text: dict[str, Any], file: str) -> None:
    for key in _REQUIRED_INT:
        value = text.get(key)
        if type(value) is not int or value < 0:
            raise CheckpointError(file, f"text config field {key!r} must be a non-negative integer, got {str(value)[:40]}")
        limit = _COUNT_LIMITS.get(key, _SIZE_LIMIT)
        if value > limit:
            raise CheckpointError(file, f"text config field {key!r} = {value} is beyond any plausible model (limit {limit})")
    for key in ("num_experts_per_tok", "n_shared_experts", "q_lora_rank", "n_group", "topk_group", "num_nextn_predict_layers"):
        value = text.get(key)
        if value is not None and (type(value) is not int or not 0 <= value <= _COUNT_LIMITS.get(key, _SIZE_LIMIT)):
            raise CheckpointError(file, f"text config field {key!r} = {str(value)[:40]} is not a plausible integer")


def expected_modules(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every text weight the config implies, as ``{module: weight shape}`` (1-D for norms)."""
    t, p = cfg.text, cfg.prefix
    hidden, heads = t["hidden_size"], t["num_attention_heads"]
    nope, rope, v_dim = t["qk_nope_head_dim"], t["qk_rope_head_dim"], t["v_head_dim"]
    kv_rank, q_rank = t["kv_lora_rank"], t.get("q_lora_rank")
    experts, moe_inter = t["n_routed_experts"], t["moe_intermediate_size"]
    shared = t.get("n_shared_experts") or 0
    freq = t.get("moe_layer_freq", 1) or 1
    mods: dict[str, tuple[int, ...]] = {
        f"{p}model.embed_tokens": (t["vocab_size"], hidden),
        f"{p}model.norm": (hidden,),
    }
    if not t.get("tie_word_embeddings", False):
        mods[f"{p}lm_head"] = (t["vocab_size"], hidden)
    mtp = t.get("num_nextn_predict_layers") or 0
    for i in range(cfg.num_layers + mtp):
        L = f"{p}model.layers.{i}"
        if i >= cfg.num_layers:  # a multi-token-prediction layer (DeepSeek-V3's 61): its own head, then a decoder block
            mods[f"{L}.embed_tokens"] = (t["vocab_size"], hidden)
            mods[f"{L}.enorm"] = (hidden,)
            mods[f"{L}.hnorm"] = (hidden,)
            mods[f"{L}.eh_proj"] = (hidden, 2 * hidden)
            mods[f"{L}.shared_head.norm"] = (hidden,)
            mods[f"{L}.shared_head.head"] = (t["vocab_size"], hidden)
        mods[f"{L}.input_layernorm"] = (hidden,)
        mods[f"{L}.post_attention_layernorm"] = (hidden,)
        a = f"{L}.self_attn"
        if q_rank:
            mods[f"{a}.q_a_proj"] = (q_rank, hidden)
            mods[f"{a}.q_a_layernorm"] = (q_rank,)
            mods[f"{a}.q_b_proj"] = (heads * (nope + rope), q_rank)
        else:
            mods[f"{a}.q_proj"] = (heads * (nope + rope), hidden)
        mods[f"{a}.kv_a_proj_with_mqa"] = (kv_rank + rope, hidden)
        mods[f"{a}.kv_a_layernorm"] = (kv_rank,)
        mods[f"{a}.kv_b_proj"] = (heads * (nope + v_dim), kv_rank)
        mods[f"{a}.o_proj"] = (hidden, heads * v_dim)
        if i >= t["first_k_dense_replace"] and i % freq == 0:
            mods[f"{L}.mlp.gate"] = (experts, hidden)
            if shared:
                _mlp(mods, f"{L}.mlp.shared_experts", moe_inter * shared, hidden)
            for e in range(experts):
                _mlp(mods, f"{L}.mlp.experts.{e}", moe_inter, hidden)
        else:
            _mlp(mods, f"{L}.mlp", t["intermediate_size"], hidden)
    return mods


def _mlp(mods: dict[str, tuple[int, ...]], base: str, inter: int, hidden: int) -> None:
    mods[f"{base}.gate_proj"] = (inter, hidden)
    mods[f"{base}.up_proj"] = (inter, hidden)
    mods[f"{base}.down_proj"] = (hidden, inter)


# Buffers some releases store beside the weights, carried through verbatim (engines recompute and skip them):
# Kimi-K2-Instruct's rotary embedding frequencies, one per layer.
CARRIED_BUFFERS = re.compile(r"^model\.layers\.(?P<layer>\d+)\.self_attn\.rotary_emb\.inv_freq$")


def is_carried_buffer(name: str, cfg: ModelConfig) -> bool:
    """Whether ``name`` is a buffer of an existing layer that is copied as it is (:data:`CARRIED_BUFFERS`)."""
    match = CARRIED_BUFFERS.match(name.removeprefix(cfg.prefix))
    return bool(match) and int(match.group("layer")) < cfg.num_layers + (cfg.text.get("num_nextn_predict_layers") or 0)


def layer_of(name: str, prefix: str) -> int | None:
    """Decoder layer index of a tensor name, or None for embeddings, head, vision tower, projector."""
    head = f"{prefix}model.layers."
    if not name.startswith(head):
        return None
    index = name[len(head) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


_ROUTED_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def routed_expert(name: str) -> int | None:
    """The routed expert a tensor or module belongs to (``...mlp.experts.7.down_proj.weight``: 7), else None."""
    m = _ROUTED_EXPERT.search(name if name.endswith(".") else f"{name}.")
    return int(m.group(1)) if m else None


def in_mtp_layer(name: str, cfg: ModelConfig) -> bool:
    """Whether a tensor or module belongs to a multi-token-prediction layer (a decoder layer past num_hidden_layers)."""
    return (layer_of(name, cfg.prefix) or 0) >= cfg.num_layers


def router_bias_expected(cfg: ModelConfig) -> bool:
    return cfg.text.get("topk_method") == "noaux_tc"
