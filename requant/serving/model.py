"""The text model of Kimi-K2.6 / DeepseekV3 in plain PyTorch, for the reference server.

MLA attention (low-rank q and kv, a shared rotary key, YaRN RoPE with interleaved rotary pairs and the
mscale attention correction), sigmoid ``noaux_tc`` routing with ``e_score_correction_bias`` and group
limits, a shared expert, top-k routed experts, RMSNorm. One sequence at a time with a key/value cache
(the keys and values decompressed from MLA's latent once per token, as transformers caches them).

Every quantized Linear carries an optional activation QDQ (see ``activations.py``). With BF16 weights
and no QDQ this matches transformers' ``DeepseekV3ForCausalLM`` (tests/serving/test_model_parity.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from requant.errors import CheckpointError
from requant.serving.checkpoint import LoadedCheckpoint


@dataclass(frozen=True)
class TextConfig:
    hidden: int
    layers: int
    first_dense: int
    heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    experts: int
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling: float
    eps: float
    vocab: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rope_interleave: bool
    max_positions: int
    bos_token_id: int | None
    eos_token_id: int | None

    @classmethod
    def from_dict(cls, t: dict[str, Any]) -> TextConfig:
        if t.get("scoring_func", "sigmoid") != "sigmoid" or t.get("topk_method", "noaux_tc") != "noaux_tc":
            raise CheckpointError("config.json", f"routing {t.get('scoring_func')}/{t.get('topk_method')} is not supported (sigmoid/noaux_tc only)")
        eos = t.get("eos_token_id")
        return cls(
            hidden=t["hidden_size"], layers=t["num_hidden_layers"], first_dense=t.get("first_k_dense_replace", 0),
            heads=t["num_attention_heads"], q_lora_rank=t.get("q_lora_rank"), kv_lora_rank=t["kv_lora_rank"],
            qk_nope=t["qk_nope_head_dim"], qk_rope=t["qk_rope_head_dim"], v_head=t["v_head_dim"],
            experts=t["n_routed_experts"], top_k=t["num_experts_per_tok"], n_group=t.get("n_group") or 1,
            topk_group=t.get("topk_group") or 1, norm_topk_prob=bool(t.get("norm_topk_prob", True)),
            routed_scaling=float(t.get("routed_scaling_factor", 1.0)), eps=float(t.get("rms_norm_eps", 1e-6)),
            vocab=t["vocab_size"], rope_theta=float(t.get("rope_theta", 10000.0)),
            rope_scaling=t.get("rope_scaling") or t.get("rope_parameters"),
            rope_interleave=bool(t.get("rope_interleave", True)),
            max_positions=int(t.get("max_position_embeddings", 4096)),
            bos_token_id=t.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: TextConfig) -> tuple[torch.Tensor, float, float]:
    """(inverse frequencies [rope_dim/2], cos/sin factor, softmax-scale multiplier) for plain or YaRN RoPE.

    YaRN (Peng et al. 2023, as DeepSeek-V3 uses it): frequencies whose wavelength fits the original
    context many times are kept (extrapolation), long ones are divided by ``factor`` (interpolation),
    with a linear ramp between the dimensions where ``beta_fast`` and ``beta_slow`` rotations fit.
    """
    dim, base = cfg.qk_rope, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / base ** exponents
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return extrapolated, 1.0, 1.0
    if kind != "yarn":
        raise CheckpointError("config.json", f"rope_scaling type {kind!r} is not supported (default or yarn)")
    factor = float(rs["factor"])
    original = float(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                # 1 = extrapolate (high frequency), 0 = interpolate
    inv_freq = (extrapolated / factor) * (1 - keep) + extrapolated * keep
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        cos_factor = float(rs["attention_factor"])
    elif mscale and mscale_all:
        cos_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        cos_factor = _yarn_mscale(factor, 1.0)
    softmax_factor = _yarn_mscale(factor, mscale_all) ** 2 if mscale_all else 1.0
    return inv_freq, cos_factor, softmax_factor


# DeepSeek's reference code (and transformers) build the q/kv low-rank norms with RMSNorm's default eps,
# not rms_norm_eps; vLLM passes rms_norm_eps. We follow the reference implementation.
LORA_NORM_EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Linear:
    """y = qdq(x) @ W^T with W already dequantized; ``qdq`` is the layer's activation spec (or None)."""

    __slots__ = ("qdq", "weight")

    def __init__(self, weight: torch.Tensor, qdq: Callable | None):
        self.weight, self.qdq = weight, qdq

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.qdq(x) if self.qdq else x, self.weight)


class Mlp:
    def __init__(self, gate: Linear, up: Linear, down: Linear):
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class KVCache:
    """Per-layer attention cache of one sequence: keys [H, T, nope + rope] and values [H, T, v], as transformers'
    DeepseekV3 caches them. Each step decompresses only its new latents (kv_b_proj on the new tokens): caching the
    latents alone would run kv_b_proj over the whole sequence at every decoded token."""

    def __init__(self, layers: int):
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[1]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            keys = torch.cat([self.keys[layer], keys], dim=1)
            values = torch.cat([self.values[layer], values], dim=1)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


class DeepseekV3Text:
    """The decoder: ``forward(token_ids [T], cache) -> logits [T, vocab]`` continuing the cached sequence."""

    def __init__(self, ckpt: LoadedCheckpoint, device: str = "cpu"):
        self.cfg = cfg = TextConfig.from_dict(ckpt.text_config)
        w = ckpt.weights
        self.uri = ckpt.uri
        self.schemes = ckpt.scheme_counts()
        self.device = torch.device(device)

        def get(name: str) -> torch.Tensor:
            if name not in w:
                raise CheckpointError(ckpt.uri, "tensor missing for serving", name)
            return w[name].to(self.device)

        def linear(module: str) -> Linear:
            return Linear(get(f"{module}.weight"), ckpt.activation.get(module))

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        self.lm_head = linear("lm_head")
        inv_freq, self.cos_factor, softmax_factor = rope_frequencies(cfg)
        self.inv_freq = inv_freq.to(self.device)
        self.softmax_scale = (cfg.qk_nope + cfg.qk_rope) ** -0.5 * softmax_factor
        self.layers = []
        for i in range(cfg.layers):
            p = f"model.layers.{i}"
            attn = {k: linear(f"{p}.self_attn.{k}") for k in ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")}
            if cfg.q_lora_rank:
                attn["q_a_proj"], attn["q_b_proj"] = linear(f"{p}.self_attn.q_a_proj"), linear(f"{p}.self_attn.q_b_proj")
                attn["q_a_layernorm"] = get(f"{p}.self_attn.q_a_layernorm.weight")
            else:
                attn["q_proj"] = linear(f"{p}.self_attn.q_proj")
            attn["kv_a_layernorm"] = get(f"{p}.self_attn.kv_a_layernorm.weight")
            layer = {"input_norm": get(f"{p}.input_layernorm.weight"),
                     "post_norm": get(f"{p}.post_attention_layernorm.weight"), "attn": attn}
            if i < cfg.first_dense:
                layer["mlp"] = Mlp(*(linear(f"{p}.mlp.{k}") for k in ("gate_proj", "up_proj", "down_proj")))
            else:
                layer["router"] = linear(f"{p}.mlp.gate")
                layer["router_bias"] = get(f"{p}.mlp.gate.e_score_correction_bias").float()
                layer["shared"] = Mlp(*(linear(f"{p}.mlp.shared_experts.{k}") for k in ("gate_proj", "up_proj", "down_proj")))
                layer["experts"] = [Mlp(*(linear(f"{p}.mlp.experts.{e}.{k}") for k in ("gate_proj", "up_proj", "down_proj")))
                                    for e in range(cfg.experts)]
            self.layers.append(layer)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.layers)

    # -- pieces -------------------------------------------------------------------------------------
    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding on x [..., T, rope]; pairs are (2i, 2i+1) when interleaved, (i, i+rope/2) otherwise."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos() * self.cos_factor, angles.sin() * self.cos_factor
        if self.cfg.rope_interleave:
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def _attention(self, attn: dict, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, i: int) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        if cfg.q_lora_rank:
            q = attn["q_b_proj"](rms_norm(attn["q_a_proj"](x), attn["q_a_layernorm"], LORA_NORM_EPS))
        else:
            q = attn["q_proj"](x)
        q = q.view(T, cfg.heads, cfg.qk_nope + cfg.qk_rope).transpose(0, 1)          # [H, T, d]
        q_nope, q_rope = q.split([cfg.qk_nope, cfg.qk_rope], dim=-1)
        kv = attn["kv_a_proj_with_mqa"](x)
        latent, k_rope = kv.split([cfg.kv_lora_rank, cfg.qk_rope], dim=-1)
        latent = rms_norm(latent, attn["kv_a_layernorm"], LORA_NORM_EPS)
        q_rope, k_rope = self._rotate(q_rope, positions), self._rotate(k_rope, positions)
        kv = attn["kv_b_proj"](latent).view(T, cfg.heads, cfg.qk_nope + cfg.v_head).transpose(0, 1)
        k_nope, v = kv.split([cfg.qk_nope, cfg.v_head], dim=-1)
        k, v = cache.append(i, torch.cat([k_nope, k_rope.unsqueeze(0).expand(cfg.heads, -1, -1)], dim=-1), v)
        S = k.shape[1]
        scores = torch.cat([q_nope, q_rope], dim=-1) @ k.transpose(1, 2) * self.softmax_scale   # [H, T, S]
        if T > 1:
            causal = torch.arange(S, device=x.device)[None, :] > (S - T + torch.arange(T, device=x.device))[:, None]
            scores = scores.masked_fill(causal, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v                     # [H, T, v]
        return attn["o_proj"](out.transpose(0, 1).reshape(T, cfg.heads * cfg.v_head))

    def route(self, layer: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """noaux_tc: sigmoid scores, bias-corrected choice within the best groups, weights from raw scores."""
        cfg = self.cfg
        router: Linear = layer["router"]
        xin = router.qdq(x) if router.qdq else x
        scores = F.linear(xin.float(), router.weight.float()).sigmoid()
        choice = scores + layer["router_bias"]
        per_group = cfg.experts // cfg.n_group
        group_scores = choice.view(-1, cfg.n_group, per_group).topk(min(2, per_group), dim=-1)[0].sum(-1)
        best_groups = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1).bool()
        choice = choice.masked_fill(~group_mask.repeat_interleave(per_group, dim=1), float("-inf"))
        index = choice.topk(cfg.top_k, dim=-1, sorted=False)[1]
        weight = scores.gather(1, index)
        if cfg.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return index, weight * cfg.routed_scaling

    def _moe(self, layer: dict, x: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        index, weight = self.route(layer, x)
        if counts is not None:
            counts += torch.bincount(index.flatten(), minlength=self.cfg.experts)
        out = torch.zeros_like(x)
        for e in torch.unique(index).tolist():
            token, slot = torch.where(index == e)
            y = layer["experts"][e](x[token]) * weight[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out + layer["shared"](x)

    # -- forward ------------------------------------------------------------------------------------
    def is_moe(self, i: int) -> bool:
        return "experts" in self.layers[i]

    def attention_out(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Layer ``i``'s attention branch on the residual stream ``h`` (appends to ``cache``)."""
        layer = self.layers[i]
        return self._attention(layer["attn"], rms_norm(h, layer["input_norm"], self.cfg.eps), positions, cache, i)

    def mlp_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.layers[i]["post_norm"], self.cfg.eps)

    def mlp_out(self, i: int, y: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        layer = self.layers[i]
        return layer["mlp"](y) if "mlp" in layer else self._moe(layer, y, counts)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, cache: KVCache,
                expert_counts: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """``expert_counts``: per layer, a [experts] tensor to which each MoE layer adds its routed-token counts.
        The logits come back on the CPU whatever the model's device (sampling and logprobs run there)."""
        start = cache.length
        positions = torch.arange(start, start + token_ids.shape[0], device=self.device)
        h = self.embed[token_ids.to(self.device)]
        for i in range(len(self.layers)):
            h = h + self.attention_out(i, h, positions, cache)
            h = h + self.mlp_out(i, self.mlp_input(i, h), expert_counts[i] if expert_counts else None)
        return self.lm_head(rms_norm(h, self.norm, self.cfg.eps)).cpu()

    @torch.inference_mode()
    def expert_counts(self, token_ids: torch.Tensor) -> dict[int, list[int]]:
        """How many tokens of ``token_ids`` (one sequence) each routed expert of each MoE layer receives."""
        counts = [torch.zeros(self.cfg.experts, dtype=torch.long, device=self.device) if self.is_moe(i) else None
                  for i in range(len(self.layers))]
        self.forward(token_ids, self.new_cache(), counts)
        return {i: c.tolist() for i, c in enumerate(counts) if c is not None}
