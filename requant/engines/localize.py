"""Where a candidate checkpoint departs from its reference: which layer, which experts.

When the smoke test's agreement fails, "KL too high" tells a user nothing to act on. This loads both checkpoints
with the reference model (``requant.serving``) and runs the smoke test's own texts through them:

- **isolated error per layer**: the reference's input to layer ``i`` goes through both models' layer ``i``; the
  relative error of the candidate's layer output (against the reference's update of the residual stream) says
  which layers are wrong on their own, whatever came before;
- **cumulative error per layer**: the candidate run on its own, its hidden state after each layer against the
  reference's, where the divergence builds up;
- **components** of each layer on the same reference input: attention, the dense MLP or, in MoE layers, the
  router (share of each token's top-k experts both choose), the shared expert and every routed expert
  (relative output error on all tokens, so an expert the texts never route to is still checked).

A component is flagged when its relative error is at least ``abs_error`` (half its output wrong) or, for routed
experts, at least ``ratio`` times its layer's median expert error (and at least ``min_error``): a conversion bug
in a few experts stands out against their honest, equally quantized peers. The first layer with a flagged
component is where the candidate diverges. Both models are held in memory, so this runs in-process only below
``max_bytes`` of checkpoint; above, the result says so and what to run instead.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from requant.io.storage import open_storage
from requant.serving.generate import Generator
from requant.serving.model import DeepseekV3Text


@dataclass(frozen=True)
class LocalizeLimits:
    abs_error: float = 0.5        # a component with half its output wrong is broken whatever its peers do
    ratio: float = 4.0            # a routed expert this many times its layer's median expert error stands out
    min_error: float = 0.05       # ... if also at least this (identical checkpoints have a median of 0)
    min_router_agreement: float = 0.5
    max_bytes: int = 16 << 30     # both checkpoints' safetensors bytes, to localize in this process


def checkpoint_bytes(uri: str) -> int:
    storage = open_storage(uri)
    return sum(storage.size(f) for f in storage.list_files() if f.endswith(".safetensors"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def localize(candidate: str, reference: str, texts: list[str] | tuple[str, ...],
             limits: LocalizeLimits = LocalizeLimits()) -> dict:
    """Per-layer and per-component errors of ``candidate`` against ``reference`` on ``texts`` (see module doc)."""
    size = checkpoint_bytes(candidate) + checkpoint_bytes(reference)
    if size > limits.max_bytes:
        return {"available": False, "limits": asdict(limits),
                "reason": (f"the two checkpoints hold {size / 2**30:.1f} GiB, over max_bytes "
                           f"{limits.max_bytes / 2**30:.1f} GiB for localizing in this process; run "
                           f"`requant localize {candidate} {reference}` on a node with the memory")}
    cand, ref = Generator.from_checkpoint(candidate), Generator.from_checkpoint(reference)
    layers: list[dict] = []
    tokens = 0
    for text in texts:
        ids = torch.tensor(ref.encode(text), dtype=torch.long)
        tokens += len(ids)
        for i, row in enumerate(_compare_layers(cand.model, ref.model, ids)):
            if i == len(layers):
                layers.append({k: [] for k in row})
            for k, v in row.items():
                layers[i][k].append(v)
    rows = [_summarize(i, row, limits) for i, row in enumerate(layers)]
    flagged = [row for row in rows if row["flagged"]]
    first = flagged[0]["layer"] if flagged else None
    return {"available": True, "candidate": candidate, "reference": reference, "texts": len(texts), "tokens": tokens,
            "first_layer": first, "layers": rows, "limits": asdict(limits), "summary": _summary(rows, first)}


@torch.inference_mode()
def _compare_layers(cand: DeepseekV3Text, ref: DeepseekV3Text, ids: torch.Tensor) -> list[dict]:
    """One text: per layer, the errors (as the sums and norms needed to pool texts) of every component."""
    positions = torch.arange(len(ids))
    ref_cache, iso_cache, cand_cache = ref.new_cache(), cand.new_cache(), cand.new_cache()
    h, hc = ref.embed[ids], cand.embed[ids]
    out = []
    for i in range(len(ref.layers)):
        a_ref = ref.attention_out(i, h, positions, ref_cache)
        a_cand = cand.attention_out(i, h, positions, iso_cache)
        mid = h + a_ref
        y = ref.mlp_input(i, mid)
        m_ref = ref.mlp_out(i, y)
        nxt = mid + m_ref
        iso_mid = h + a_cand
        iso = iso_mid + cand.mlp_out(i, cand.mlp_input(i, iso_mid))
        hc = hc + cand.attention_out(i, hc, positions, cand_cache)
        hc = hc + cand.mlp_out(i, cand.mlp_input(i, hc))
        row = {"isolated": _pair(iso - nxt, nxt - h), "cumulative": _pair(hc - nxt, nxt),
               "attention": _pair(a_cand - a_ref, a_ref)}
        if ref.is_moe(i):
            lr, lc = ref.layers[i], cand.layers[i]
            index_ref, index_cand = ref.route(lr, y)[0], cand.route(lc, y)[0]
            same = (index_ref.unsqueeze(-1) == index_cand.unsqueeze(-2)).any(-1).sum()
            row["router"] = (float(same), float(index_ref.numel()))
            row["shared"] = _pair(lc["shared"](y) - lr["shared"](y), lr["shared"](y))
            for e, (ec, er) in enumerate(zip(lc["experts"], lr["experts"])):
                want = er(y)
                row[f"expert{e}"] = _pair(ec(y) - want, want)
        else:
            row["mlp"] = _pair(cand.mlp_out(i, y) - m_ref, m_ref)
        out.append(row)
        h = nxt
    return out


def _pair(diff: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """Squared norms, so texts pool as sqrt(sum diff^2 / sum base^2)."""
    return float(diff.float().pow(2).sum()), float(base.float().pow(2).sum())


def _pooled(pairs: list[tuple[float, float]]) -> float:
    num, den = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def _summarize(i: int, row: dict, limits: LocalizeLimits) -> dict:
    out = {"layer": i, "moe": "router" in row, "isolated_error": _pooled(row["isolated"]),
           "cumulative_error": _pooled(row["cumulative"]), "attention_error": _pooled(row["attention"])}
    flagged: list[str] = []
    if out["attention_error"] >= limits.abs_error:
        flagged.append("attention")
    if out["moe"]:
        out["router_agreement"] = sum(s for s, _ in row["router"]) / max(sum(n for _, n in row["router"]), 1.0)
        out["shared_error"] = _pooled(row["shared"])
        experts = [_pooled(row[f"expert{e}"]) for e in range(sum(k.startswith("expert") for k in row))]
        median = statistics.median(experts)
        out["expert_errors"] = experts
        out["expert_median_error"] = median
        bad = [e for e, err in enumerate(experts)
               if err >= limits.abs_error or (err >= limits.ratio * median and err >= limits.min_error)]
        out["flagged_experts"] = sorted(bad, key=lambda e: -experts[e])
        if out["router_agreement"] < limits.min_router_agreement:
            flagged.append("router")
        if out["shared_error"] >= limits.abs_error:
            flagged.append("shared expert")
        if bad:
            flagged.append("experts " + ", ".join(map(str, sorted(bad))))
    else:
        out["mlp_error"] = _pooled(row["mlp"])
        if out["mlp_error"] >= limits.abs_error:
            flagged.append("dense MLP")
    out["flagged"] = flagged
    return out


def _summary(rows: list[dict], first: int | None) -> str:
    if first is None:
        worst = max(rows, key=lambda r: r["isolated_error"])
        return (f"no layer stands out (largest isolated error {worst['isolated_error']:.3f} at layer "
                f"{worst['layer']}): the difference is spread over the model, not one broken part")
    parts = []
    for row in rows:
        if row["flagged"]:
            detail = "; ".join(row["flagged"])
            if row.get("flagged_experts"):
                errs = ", ".join(f"{e}: {row['expert_errors'][e]:.2f}" for e in row["flagged_experts"][:8])
                detail += f" (relative error {errs}; layer median {row['expert_median_error']:.3f})"
            parts.append(f"layer {row['layer']}: {detail}")
    return f"diverges first at layer {first}; " + "; ".join(parts)


def format_localization(result: dict) -> str:
    if not result.get("available"):
        return f"localization: not run ({result.get('reason')})"
    lines = [f"localization: {result['summary']}"]
    for row in result["layers"]:
        extra = (f", router agreement {row['router_agreement']:.2f}, shared {row['shared_error']:.3f}, "
                 f"expert median {row['expert_median_error']:.3f} max {max(row['expert_errors']):.3f}"
                 if row["moe"] else f", dense MLP {row['mlp_error']:.3f}")
        lines.append(f"  layer {row['layer']}: isolated {row['isolated_error']:.3f}, cumulative "
                     f"{row['cumulative_error']:.3f}, attention {row['attention_error']:.3f}{extra}")
    return "\n".join(lines)
