"""The sections of a model card, each rendered from its facts as a list of lines."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from requant.card.derived import (
    FORMAT_DETAILS,
    FORMAT_LABELS,
    KEPT_WHY,
    SERVING_TP,
    Tally,
    builtin_recipe,
    gib_per_gpu,
    hub_url,
    label,
    licence,
    model_name,
    size,
    tensor_bytes,
    text_config,
    verdict,
)
from requant.card.facts import CardFacts
from requant.export import container
from requant.export.quark import ENGINE_FUSED_MODULES
from requant.layout import TENSOR_CLASSES, classify
from requant.manifest import EVAL_DIR, MANIFEST_FILE, UPSTREAM_CARD, eval_path


def title(facts: CardFacts) -> list[str]:
    m, release = facts.manifest, facts.release
    heading = (release.repo_id if release and release.repo_id
               else f"{m['upstream'].get('id')} · {m['recipe']['name']}")
    lines = [f"# {heading}"]
    if release and release.forced:
        lines += ["", f"> ⚠️ **Released past the quality gate.** Its verdict is {verdict(facts)}, not PASS; the release "
                      f"was forced with this reason: {release.forced}"]
    return lines


def overview(facts: CardFacts, by_storage: dict[str, Tally]) -> list[str]:
    m, recipe = facts.manifest, facts.manifest["recipe"]
    up = m["upstream"]
    total = sum(t.parameters for t in by_storage.values())
    formats = sorted(s for s in by_storage if s in FORMAT_LABELS)
    shares = ", ".join(f"{label(s)} {100 * by_storage[s].parameters / total:.1f}%" for s in formats) or "none"
    what = (f"stored in {container(recipe)} ({', '.join(label(s) for s in formats)})"
            if formats else "dequantized to BF16 (no quantization_config)")
    builtin = builtin_recipe(recipe)
    lines = [f"`{up.get('id')}` (revision `{up.get('revision')}`) re-quantized by requant with the recipe "
             f"`{recipe['name']}`: {what}. Everything else is the upstream's, byte for byte: tokenizer, remote code, "
             f"configs (except `quantization_config`) and licence." + (f" Recipe: {builtin[0]}" if builtin else ""), ""]
    lines += [*(f"- **{label(s)}**: {FORMAT_DETAILS[s]}." for s in formats), *([""] if formats else [])]
    weights = sum(o["size"] for f, o in m["outputs"].items() if f.endswith(".safetensors"))
    upstream = sum(s["size"] for s in m["inputs"]["shards"].values())
    hub = hub_url(up.get("id", ""))
    base = f"[`{up.get('id')}`]({hub})" if hub else f"`{up.get('id')}`"
    lines += ["| | |", "|---|---|",
              f"| Base model | {base} at `{up.get('revision')}` |",
              *([f"| Upstream format | `{src['format']}`: {src['description']} |"] if (src := m.get("source")) else []),
              f"| Recipe | `{recipe['name']}` (global format `{recipe['format']}`) |",
              f"| Quantized parameters | {shares} of {total:,} |",
              f"| Weights on disk | {size(weights)} (upstream: {size(upstream)}) |",
              f"| Weight memory at TP={SERVING_TP} | {gib_per_gpu(tensor_bytes(m))} (weights only) |",
              f"| GSM8K quality gate | {verdict(facts)} |"]
    return lines


def coverage(facts: CardFacts, by_storage: dict[str, Tally], by_class: dict[tuple[str, str], Tally]) -> list[str]:
    m = facts.manifest
    total = sum(t.parameters for t in by_storage.values())
    lines = ["## Coverage", "", "What is stored how, counted from the manifest's tensors (dtype x shape). A quantized "
             "weight counts its logical elements as parameters; its scales count as tensors and bytes only.", "",
             "| stored as | tensors | parameters | share of parameters | bytes |", "|---|---|---|---|---|"]
    order = sorted(by_storage, key=lambda s: (s not in FORMAT_LABELS, s))
    for s in order:
        t = by_storage[s]
        lines.append(f"| {label(s)} | {t.tensors:,} | {t.parameters:,} | {100 * t.parameters / total:.2f}% | "
                     f"{t.nbytes:,} |")
    lines += ["", "Per tensor class (unquantized classes with the reason published recipes keep them):", "",
              "| class | stored as | tensors | parameters | why unquantized |", "|---|---|---|---|---|"]
    rank = {c: k for k, c in enumerate(TENSOR_CLASSES)}
    quantized = {cls for cls, s in by_class if s in FORMAT_LABELS}
    for cls, s in sorted(by_class, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1] not in FORMAT_LABELS, k[1])):
        t = by_class[cls, s]
        if s in FORMAT_LABELS:
            why = ""
        elif cls in quantized:
            why = "not Linear weights (biases); Quark quantizes Linear weights only"
        else:
            why = KEPT_WHY.get(cls, f"the recipe `{m['recipe']['name']}` keeps it unquantized")
        lines.append(f"| {cls} | {label(s)} | {t.tensors:,} | {t.parameters:,} | {why} |")
    lines += ["", *_excluded(facts), "", *_snr(m)]
    weights = {f: o["size"] for f, o in m["outputs"].items() if f.endswith(".safetensors")}
    upstream = m["inputs"]["shards"]
    up_size = sum(s["size"] for s in upstream.values())
    ratio = f" ({100 * sum(weights.values()) / up_size:.0f}% of it)" if up_size else ""
    lines += ["", f"Weights on disk: {size(sum(weights.values()))} in {len(weights)} shards; the upstream's: "
                  f"{size(up_size)} in {len(upstream)} shards{ratio}."]
    return lines


def _excluded(facts: CardFacts) -> list[str]:
    quant = facts.config.get("quantization_config")
    if not isinstance(quant, dict):
        return ["No `quantization_config`: nothing is quantized."]
    counts: dict[str, int] = defaultdict(int)
    fused = 0
    for name in quant.get("exclude", ()):
        if name.rsplit(".", 1)[-1] in ENGINE_FUSED_MODULES:
            fused += 1
        else:
            counts[classify(name) or "other"] += 1
    shown = ", ".join(f"{cls} {n:,}" for cls, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"
    lines = [f"Excluded from quantization (`quantization_config.exclude` in `config.json`, exact module names): "
             f"{sum(counts.values()):,} modules ({shown})"]
    if fused:
        lines[0] += (f", and {fused:,} names of the modules SGLang and vLLM fuse from excluded parts "
                     "(`gate_up_proj`, `fused_qkv_a_proj*`), so that those engines keep them unquantized too")
    layers = quant.get("layer_quant_config") or {}
    if layers:
        lines[0] += ". Other formats by pattern (`layer_quant_config`): " + ", ".join(
            f"`{p}` {c.get('weight', {}).get('dtype')}" for p, c in layers.items())
    lines[0] += "."
    return lines


def _snr(manifest: dict[str, Any]) -> list[str]:
    stats = manifest.get("stats") or {}
    snrs = [s["snr_db"] for s in stats.values() if s.get("snr_db") is not None]
    exact = sum(1 for s in stats.values() if s.get("exact"))
    if not snrs:
        return []
    bound = manifest["recipe"].get("min_snr_db")
    floor = f"; the recipe requires at least {bound:g} dB" if bound is not None else ""
    return [f"Re-quantization error: {len(stats):,} quantized modules measured against their upstream values "
            f"(sampled rows); SNR min {min(snrs):.2f} dB, mean {sum(snrs) / len(snrs):.2f} dB"
            f"{f', {exact} exact' if exact else ''}{floor} (per module in `{MANIFEST_FILE}`)."]


def quality(facts: CardFacts) -> list[str]:
    lines = ["## Quality", ""]
    if facts.comparison is not None:
        from requant.evaluation.downstream import PLOT_PNG, REPORT_MD
        from requant.evaluation.report import quality_section

        figure = eval_path(PLOT_PNG) if eval_path(PLOT_PNG) in facts.manifest["outputs"] else None
        lines.append(quality_section(facts.comparison, facts.smoke, figure=figure).strip("\n"))
        lines += ["", *_context((facts.report or {}).get("context") or {}, eval_path(REPORT_MD))]
    elif facts.smoke is not None:
        from requant.evaluation.report import smoke_lines

        lines.append("GSM8K did not run: the smoke test came first and failed. The release gate refuses this "
                     "checkpoint.")
        lines += smoke_lines(facts.smoke, "###")
    else:
        lines.append("Not evaluated. No smoke test or GSM8K comparison has been published into this checkpoint "
                     f"(`{EVAL_DIR}/`), and requant's release gate refuses such a checkpoint unless a person forces "
                     "the release and says why.")
    others = sorted(p for p in facts.manifest.get("evaluations") or {} if p != EVAL_DIR)
    if others:
        lines += ["", "GSM8K runs of this checkpoint kept for comparisons against it (as a reference): "
                  + ", ".join(f"`{p}/`" for p in others) + "."]
    return lines


def _context(context: dict[str, Any], report_md: str) -> list[str]:
    settings = context.get("settings") or {}
    engines = context.get("engines") or {}
    parts = []
    if engines or context.get("engine"):
        parts.append(f"served by `{engines.get('candidate', context.get('engine'))}` (this model) and "
                     f"`{engines.get('reference', context.get('engine'))}` (reference)")
    if context.get("reference"):
        parts.append(f"reference checkpoint `{context['reference']}`")
    if settings:
        limit = settings.get("limit")
        parts.append(f"data `{settings.get('data')}`, {'all items' if limit is None else f'first {limit} items'}")
    return [f"Evaluation setup: {'; '.join(parts)}. Full report: `{report_md}`, per-item samples "
            f"under `{EVAL_DIR}/candidate/`."] if parts else []


def architecture(facts: CardFacts, by_storage: dict[str, Tally], by_class: dict[tuple[str, str], Tally]) -> list[str]:
    c, t = facts.config, text_config(facts.config)
    rows = [("architecture", ", ".join(c.get("architectures") or []) + (
        f" (text: {', '.join(t.get('architectures') or [t.get('model_type', '?')])})" if t is not c else ""))]
    layers, dense = t.get("num_hidden_layers"), t.get("first_k_dense_replace", 0)
    rows.append(("layers", f"{layers} ({dense} dense, {layers - dense} MoE)" if isinstance(layers, int) else None))
    rows.append(("hidden size", t.get("hidden_size")))
    if t.get("n_routed_experts"):
        rows.append(("experts", f"{t['n_routed_experts']} routed + {t.get('n_shared_experts') or 0} shared per MoE "
                     f"layer, {t.get('num_experts_per_tok')} routed experts per token "
                     f"({t.get('scoring_func', '?')} scoring, {t.get('topk_method', '?')}); expert intermediate size "
                     f"{t.get('moe_intermediate_size')}, dense {t.get('intermediate_size')}"))
    if t.get("kv_lora_rank"):
        rows.append(("attention", f"MLA (multi-head latent attention), {t.get('num_attention_heads')} heads, "
                     f"q_lora_rank {t.get('q_lora_rank')}, kv_lora_rank {t['kv_lora_rank']}, head dims "
                     f"{t.get('qk_nope_head_dim')} + {t.get('qk_rope_head_dim')} rope, v {t.get('v_head_dim')}"))
    rows.append(("vocabulary", t.get("vocab_size")))
    rope = t.get("rope_scaling") or {}
    rows.append(("context length", f"{t.get('max_position_embeddings')}" + (
        f" ({rope.get('type') or rope.get('rope_type')} x{rope.get('factor')} over "
        f"{rope.get('original_max_position_embeddings')})" if rope else "")))
    if isinstance(c.get("vision_config"), dict):
        rows.append(("vision", f"{c['vision_config'].get('model_type', 'vision tower')} (kept unquantized)"))
    total = sum(x.parameters for x in by_storage.values())
    rows.append(("parameters", f"{total:,} in all" + _active(t, total, by_class)))
    return ["## Architecture", "", "From `config.json`:", "", "| | |", "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows if v is not None)]


def _active(text: dict[str, Any], total: int, by_class: dict[tuple[str, str], Tally]) -> str:
    experts, per_token = text.get("n_routed_experts"), text.get("num_experts_per_tok")
    if not experts or not per_token:
        return ""
    routed = sum(t.parameters for (cls, _), t in by_class.items() if cls == "routed_expert")
    vision = sum(t.parameters for (cls, _), t in by_class.items() if cls in ("vision_tower", "mm_projector"))
    active = total - vision - routed + routed * per_token / experts
    return f"; {active:,.0f} active per token in the text model ({per_token} of {experts} routed experts)"


def limitations(facts: CardFacts, by_class: dict[tuple[str, str], Tally]) -> list[str]:
    m = facts.manifest
    lines = ["## Limitations", ""]
    lines += [f"> **Serving note:** {w}\n" for w in m["recipe"].get("warnings", ())]
    if facts.comparison is not None:
        comp, context = facts.comparison, (facts.report or {}).get("context") or {}
        lines.append(f"- Quality was measured on GSM8K only ({comp.n_items} items x {len(comp.shared_seeds)} "
                     f"seeds, {comp.num_fewshot}-shot, served by `{context.get('engine', 'unknown engine')}`); "
                     "no other task (knowledge, long context, coding, tool use, images) was compared.")
    else:
        lines.append("- No quality evaluation has been published into this checkpoint.")
    if any(cls in ("vision_tower", "mm_projector") for cls, _ in by_class):
        lines.append("- The vision tower and projector are the upstream's, unquantized; image inputs were not "
                     "evaluated.")
    builtin = builtin_recipe(m["recipe"])
    if builtin and "engine" in builtin[1].lanes:
        lines.append("- requant's engine lane checks on CPUs that vLLM and SGLang decide every layer's quantization as "
                     "this recipe says; it serves no quantized checkpoint on a GPU.")
    if builtin and builtin[1].vllm_cpu_stop:
        stage, reason = builtin[1].vllm_cpu_stop
        lines.append(f"- vLLM for CPUs cannot serve it (stops at {stage}: {reason}).")
    unverified = m.get("unverified_inputs") or []
    if unverified:
        lines += ["", f"> **Unverified inputs:** {len(unverified)} upstream files were converted without being checked "
                      f"against a published digest (the upstream publishes none for them; `--unverified`): "
                      f"{', '.join(f'`{f}`' for f in unverified)}."]
    return lines


def provenance(facts: CardFacts) -> list[str]:
    return ["## Provenance", "",
            f"`{MANIFEST_FILE}` records the upstream, the recipe, the library versions, every input's and output's size "
            f"and sha256, every tensor and the re-quantization error per module; it carries its own digest. "
            f"`requant verify {model_name(facts)}` checks all of it, the `{EVAL_DIR}/` reports included. "
            f"The upstream model card is kept verbatim as `{UPSTREAM_CARD}`."]


def licence_and_attribution(facts: CardFacts) -> list[str]:
    up = facts.manifest["upstream"].get("id")
    fields = licence(facts)
    name = fields.get("license_name", fields["license"])
    first = next((s.strip() for s in (facts.license_text or "").splitlines() if s.strip()), None)
    kept = (f"The upstream's licence is kept verbatim as [`{facts.license_file}`]({facts.license_file})"
            + (f" ({first})" if first else "") + "." if facts.license_file else "The upstream ships no licence file.")
    return ["## License and attribution", "",
            f"The weights are `{up}`'s, re-encoded; its licence (`{name}`) applies to this checkpoint unchanged. "
            f"{kept} Credit for the model goes to its authors; requant only changed the numeric format of the "
            "weights named above."]


def citation(facts: CardFacts) -> list[str]:
    m = facts.manifest
    year = str(m.get("created", ""))[:4] or "n.d."
    version = (m.get("versions") or {}).get("requant", "unknown")
    return ["## Citation", "", f"To cite the model, cite `{m['upstream'].get('id')}` as its card asks (kept as "
            f"`{UPSTREAM_CARD}`). To cite the conversion:", "", "```bibtex", "@software{requant,",
            "  title = {requant: re-quantizing Kimi-K2.6-family MoE checkpoints to MXFP4 and FP8},",
            f"  version = {{{version}}},", f"  year = {{{year}}},", f"  note = {{recipe {m['recipe']['name']}}}",
            "}", "```"]
