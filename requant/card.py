"""The model card (``README.md``) of a converted checkpoint, rendered from facts, never typed by hand.

:class:`CardFacts` gathers what a checkpoint says about itself: its manifest (upstream, recipe, versions, files,
tensors, SNR), its ``config.json``, the upstream's licence file and card metadata (both copied verbatim), and the
evaluation published under ``eval/``; :func:`render_card` turns them into a Hub card with its metadata block.
Conversion renders the card without an evaluation, ``publish_evaluation`` renders it again once the report lands,
and the release step renders it with :class:`ReleaseFacts`; nothing else writes a card.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from requant.engines.engines import load_engines
from requant.errors import RequantError
from requant.formats.table import DEFAULT_QUARK, weight_formats
from requant.io.safetensors import tensor_nbytes
from requant.layout import TENSOR_CLASSES, classify
from requant.manifest import (
    CONFIG_FILE,
    EVAL_DIR,
    MANIFEST_FILE,
    UPSTREAM_CARD,
    eval_path,
    is_evaluation,
    read_manifest,
)
from requant.quark_config import ENGINE_FUSED_MODULES
from requant.recipe import RecipeChecks, builtin_names, load_checks, load_recipe, resolve_target

if TYPE_CHECKING:
    from requant.evaluation.compare import Comparison

SERVING_TP = 8  # one 8-GPU node (MI355X / H200 class), as the published Kimi MXFP4 cards serve it
LICENSE_FILE = re.compile(r"(?i)(licen[cs]e|copying)([-.][\w.-]+)?")  # top-level licence files the upstream may ship
FORMAT_LABELS = {"mxfp4": "MXFP4", "fp8_per_channel": "FP8 per channel"}
FORMAT_DETAILS = {
    "mxfp4": "OCP MXFP4: FP4 (E2M1) weights, one E8M0 scale per 32 inputs; activations quantized to MXFP4 "
             "at run time (dynamic)",
    "fp8_per_channel": "FP8 E4M3 weights with one scale per output channel (Quark `ptpc_fp8`); activations FP8 per "
                       "token at run time (dynamic)",
}
# Why published Kimi recipes keep a tensor class in its upstream precision (../shared/docs/formats.md, docs/recipes.md)
KEPT_WHY = {
    "norm": "Quark's export never quantizes norms",
    "embedding": "Quark's export never quantizes embeddings",
    "router": "the MoE router (`mlp.gate`) picks the experts; vLLM and SGLang build it unquantized",
    "lm_head": "the output projection; every published Kimi MXFP4 recipe keeps it BF16",
    "attention": "MLA attention projections; excluded by Quark's `kimi_k25` template (`*self_attn*`)",
    "shared_expert": "the shared expert runs for every token; excluded by Quark's `kimi_k25` template",
    "dense_mlp": "the dense MLP of the first layer(s); excluded by Quark's `kimi_k25` template",
    "vision_tower": "the vision encoder; excluded by every published Kimi recipe (`*vision_tower*`)",
    "mm_projector": "the vision-to-text projector; excluded by every published Kimi recipe (`*mm_projector*`)",
}


@dataclass(frozen=True)
class ReleaseFacts:
    """What the release step adds: where the card is published, and why a release went past a gate that did
    not PASS (None: it did not)."""

    repo_id: str | None = None
    forced: str | None = None


@dataclass(frozen=True)
class CardFacts:
    manifest: dict[str, Any]
    config: dict[str, Any]                  # the output config.json
    license_file: str | None = None         # the upstream's licence file, copied verbatim (e.g. LICENSE)
    license_text: str | None = None
    upstream_meta: dict[str, Any] | None = None  # the upstream card's front matter (UPSTREAM_README.md)
    report: dict[str, Any] | None = None    # eval/report.json: comparison, smoke, context, candidate, reference
    comparison: Comparison | None = None    # the report's comparison, read back
    smoke: dict[str, Any] | None = None     # the smoke test (eval/smoke.json; also when GSM8K never ran)
    release: ReleaseFacts | None = None

    @classmethod
    def from_checkpoint(cls, storage, manifest: dict[str, Any] | None = None,
                        release: ReleaseFacts | None = None) -> CardFacts:
        """The facts of the checkpoint at ``storage`` (a directory or s3://); ``manifest`` when it is not
        written yet (conversion) or is about to be rewritten (publishing an evaluation). Files count when the
        manifest lists them."""
        manifest = read_manifest(storage) if manifest is None else manifest
        names = set(manifest.get("outputs", {}))
        license_file = next((n for n in sorted(names) if LICENSE_FILE.fullmatch(n)), None)
        report = comparison = smoke = None
        if any(is_evaluation(n) for n in names):
            # the evaluation's modules (scipy, matplotlib, lm-eval) load only for a checkpoint that has one
            from requant.evaluation.downstream import REPORT_JSON, SMOKE_JSON
            from requant.evaluation.report import comparison_from_json

            if eval_path(REPORT_JSON) in names:
                where = f"{storage.uri}/{eval_path(REPORT_JSON)}"
                report = _json(storage, eval_path(REPORT_JSON))
                if not isinstance(report, dict):
                    raise RequantError(f"{where}: not a report requant wrote (expected an object)")
                comparison = comparison_from_json(report.get("comparison"), where)
            smoke = _json(storage, eval_path(SMOKE_JSON)) if eval_path(SMOKE_JSON) in names else None
        return cls(
            manifest=manifest, config=_json(storage, CONFIG_FILE), license_file=license_file,
            license_text=storage.read_bytes(license_file).decode("utf-8", "replace") if license_file else None,
            upstream_meta=front_matter(storage.read_bytes(UPSTREAM_CARD).decode("utf-8", "replace"))
            if UPSTREAM_CARD in names else {},
            report=report, comparison=comparison, smoke=report.get("smoke") if report else smoke, release=release)


def _json(storage, name: str) -> Any:
    try:
        return json.loads(storage.read_bytes(name))
    except ValueError as exc:
        raise RequantError(f"{storage.uri}/{name}: not valid JSON ({exc})") from exc


def front_matter(card: str) -> dict[str, Any]:
    """A card's YAML metadata block; {} when it has none or it is not a mapping (an upstream's card is theirs)."""
    match = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", card, re.DOTALL)
    try:
        data = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------- derived numbers
@dataclass
class Tally:
    tensors: int = 0
    parameters: int = 0  # weight elements: a quantized weight's logical elements, scales not counted
    nbytes: int = 0


def coverage(manifest: dict[str, Any]) -> tuple[dict[str, Tally], dict[tuple[str, str], Tally]]:
    """Per storage ("mxfp4", "fp8_per_channel" or an unquantized dtype such as "BF16"), and per (tensor class,
    storage): tensors, parameters and bytes, from the manifest's tensors and the recipe it records. A module is
    stored quantized when it has a ``weight_scale``; its format is its target under the recipe."""
    recipe, tensors = manifest["recipe"], manifest["tensors"]
    formats = weight_formats(recipe.get("quark_version", DEFAULT_QUARK))
    overrides = [tuple(o) for o in recipe.get("overrides", ())]
    by_storage: dict[str, Tally] = defaultdict(Tally)
    by_class: dict[tuple[str, str], Tally] = defaultdict(Tally)
    for name, entry in tensors.items():
        module, _, param = name.rpartition(".")
        found = classify(module)
        cls, fmt = found or "other", None
        if param in ("weight", "weight_scale") and f"{module}.weight_scale" in tensors:
            fmt = formats.get(resolve_target(module, recipe["targets"], overrides, found))
            if fmt is None:
                raise RequantError(f"{MANIFEST_FILE}: {name}: stored with a scale, but recipe {recipe['name']} "
                                   "leaves the module unquantized")
        numel = math.prod(entry["shape"])
        parameters = 0 if param == "weight_scale" and fmt else numel * (fmt.elements_per_byte if fmt else 1)
        storage = fmt.name if fmt else entry["dtype"]
        for tally in (by_storage[storage], by_class[cls, storage]):
            tally.tensors += 1
            tally.parameters += parameters
            tally.nbytes += tensor_nbytes(entry["dtype"], entry["shape"])
    return dict(by_storage), dict(by_class)


def tensor_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of tensor data (dtype x shape) in the checkpoint: what the engines load."""
    return sum(tensor_nbytes(t["dtype"], t["shape"]) for t in manifest["tensors"].values())


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _label(storage: str) -> str:
    return FORMAT_LABELS.get(storage, storage)


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _gib_per_gpu(total: int) -> str:
    return f"{total / SERVING_TP / 2**30:.2f} GiB per GPU"


def _builtin(recipe: dict[str, Any]) -> tuple[str, RecipeChecks] | None:
    """The built-in recipe's description and checks, when the manifest's recipe is that built-in unchanged."""
    name = recipe.get("name")
    if recipe.get("source") != f"builtin:{name}" or name not in builtin_names():
        return None
    current = load_recipe(name)
    if dict(current.targets) != recipe.get("targets") or [list(o) for o in current.overrides] != recipe.get("overrides"):
        return None
    return current.description, load_checks(name)


def verdict(facts: CardFacts) -> str:
    if facts.comparison is not None:
        return facts.comparison.verdict
    if facts.smoke is not None and not facts.smoke.get("passed"):
        return "SMOKE TEST FAILED"
    return "NOT EVALUATED"


# --------------------------------------------------------------------------------------------- metadata
def licence(facts: CardFacts) -> dict[str, str]:
    """The licence fields of the card's metadata: the upstream card's ``license``, else "other" with a name and a
    link to the licence file kept verbatim (as the Hub asks for "other")."""
    meta = facts.upstream_meta or {}
    lic = meta.get("license") if isinstance(meta.get("license"), str) else "other"
    if lic != "other":
        return {"license": lic}
    upstream_id = facts.manifest["upstream"].get("id", "upstream")
    slug = re.sub(r"[^a-z0-9.-]+", "-", upstream_id.rsplit("/", 1)[-1].lower()).strip("-") + "-license"
    link = facts.license_file or meta.get("license_link") or _hub_url(upstream_id)
    fields = {"license": "other", "license_name": str(meta.get("license_name") or slug)}
    return {**fields, "license_link": str(link)} if link else fields


def _hub_url(repo_id: str) -> str | None:
    return f"https://huggingface.co/{repo_id}" if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) else None


def metadata(facts: CardFacts, by_storage: dict[str, Tally]) -> dict[str, Any]:
    recipe = facts.manifest["recipe"]
    quantized = [s for s in by_storage if s in FORMAT_LABELS]
    tags = [*(s.split("_")[0] for s in sorted(quantized)), *(["quark"] if "quantization_config" in facts.config else []),
            recipe["name"], "requant", "moe"]
    return {"base_model": facts.manifest["upstream"].get("id"), "base_model_relation": "quantized", **licence(facts),
            "library_name": "transformers", "pipeline_tag": "text-generation", "tags": list(dict.fromkeys(tags))}


# --------------------------------------------------------------------------------------------- sections
def render_card(facts: CardFacts) -> str:
    by_storage, by_class = coverage(facts.manifest)
    yaml_block = yaml.safe_dump(metadata(facts, by_storage), sort_keys=False, allow_unicode=True).strip()
    sections = [_title(facts), _overview(facts, by_storage), _coverage(facts, by_storage, by_class), _quality(facts),
                _architecture(facts, by_storage, by_class), _serving(facts, by_class), _limitations(facts, by_class),
                _reproduction(facts), _provenance(facts), _licence_section(facts), _citation(facts)]
    return f"---\n{yaml_block}\n---\n\n" + "\n\n".join("\n".join(s).strip("\n") for s in sections) + "\n"


def _model_name(facts: CardFacts) -> str:
    release = facts.release
    return release.repo_id if release and release.repo_id else "MODEL"


def _title(facts: CardFacts) -> list[str]:
    m, release = facts.manifest, facts.release
    title = release.repo_id if release and release.repo_id else f"{m['upstream'].get('id')} · {m['recipe']['name']}"
    lines = [f"# {title}"]
    if release and release.forced:
        lines += ["", f"> ⚠️ **Released past the quality gate.** Its verdict is {verdict(facts)}, not PASS; the release "
                      f"was forced with this reason: {release.forced}"]
    return lines


def _overview(facts: CardFacts, by_storage: dict[str, Tally]) -> list[str]:
    m, recipe = facts.manifest, facts.manifest["recipe"]
    up = m["upstream"]
    total = sum(t.parameters for t in by_storage.values())
    formats = sorted(s for s in by_storage if s in FORMAT_LABELS)
    shares = ", ".join(f"{_label(s)} {100 * by_storage[s].parameters / total:.1f}%" for s in formats) or "none"
    quark = f"AMD Quark {recipe.get('quark_version', DEFAULT_QUARK)}"
    what = (f"stored in {quark}'s `real_quantized` export format ({', '.join(_label(s) for s in formats)})"
            if formats else "dequantized to BF16 (no quantization_config)")
    builtin = _builtin(recipe)
    lines = [f"`{up.get('id')}` (revision `{up.get('revision')}`) re-quantized by requant with the recipe "
             f"`{recipe['name']}`: {what}. Everything else is the upstream's, byte for byte: tokenizer, remote code, "
             f"configs (except `quantization_config`) and licence." + (f" Recipe: {builtin[0]}" if builtin else ""), ""]
    lines += [*(f"- **{_label(s)}**: {FORMAT_DETAILS[s]}." for s in formats), *([""] if formats else [])]
    weights = sum(o["size"] for f, o in m["outputs"].items() if f.endswith(".safetensors"))
    upstream = sum(s["size"] for s in m["inputs"]["shards"].values())
    hub = _hub_url(up.get("id", ""))
    base = f"[`{up.get('id')}`]({hub})" if hub else f"`{up.get('id')}`"
    lines += ["| | |", "|---|---|",
              f"| Base model | {base} at `{up.get('revision')}` |",
              f"| Recipe | `{recipe['name']}` (global format `{recipe['format']}`) |",
              f"| Quantized parameters | {shares} of {total:,} |",
              f"| Weights on disk | {_size(weights)} (upstream: {_size(upstream)}) |",
              f"| Weight memory at TP={SERVING_TP} | {_gib_per_gpu(tensor_bytes(m))} (weights only) |",
              f"| GSM8K quality gate | {verdict(facts)} |"]
    return lines


def _coverage(facts: CardFacts, by_storage: dict[str, Tally], by_class: dict[tuple[str, str], Tally]) -> list[str]:
    m = facts.manifest
    total = sum(t.parameters for t in by_storage.values())
    lines = ["## Coverage", "", "What is stored how, counted from the manifest's tensors (dtype x shape). A quantized "
             "weight counts its logical elements as parameters; its scales count as tensors and bytes only.", "",
             "| stored as | tensors | parameters | share of parameters | bytes |", "|---|---|---|---|---|"]
    order = sorted(by_storage, key=lambda s: (s not in FORMAT_LABELS, s))
    for s in order:
        t = by_storage[s]
        lines.append(f"| {_label(s)} | {t.tensors:,} | {t.parameters:,} | {100 * t.parameters / total:.2f}% | "
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
        lines.append(f"| {cls} | {_label(s)} | {t.tensors:,} | {t.parameters:,} | {why} |")
    lines += ["", *_excluded(facts), "", *_snr(m)]
    weights = {f: o["size"] for f, o in m["outputs"].items() if f.endswith(".safetensors")}
    upstream = m["inputs"]["shards"]
    up_size = sum(s["size"] for s in upstream.values())
    ratio = f" ({100 * sum(weights.values()) / up_size:.0f}% of it)" if up_size else ""
    lines += ["", f"Weights on disk: {_size(sum(weights.values()))} in {len(weights)} shards; the upstream's: "
                  f"{_size(up_size)} in {len(upstream)} shards{ratio}."]
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


def _quality(facts: CardFacts) -> list[str]:
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


def _architecture(facts: CardFacts, by_storage: dict[str, Tally], by_class: dict[tuple[str, str], Tally]) -> list[str]:
    c, t = facts.config, _text_config(facts.config)
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


def _engine_verdicts(facts: CardFacts, by_class: dict[tuple[str, str], Tally]) -> dict[str, str | None]:
    """Per engine of engines.yaml offered on the card: None when it is expected to load the checkpoint, else why
    not (what requant's engine lane saw vLLM and SGLang decide; docs/recipes.md)."""
    quantized = {cls for cls, s in by_class if s in FORMAT_LABELS}
    recipe = facts.manifest["recipe"]
    verdicts: dict[str, str | None] = {"vllm": None, "sglang": None, "atom": None}
    if "router" in quantized:
        verdicts["vllm"] = "vLLM builds the MoE router (`mlp.gate`) unquantized and refuses quantized router weights"
        verdicts["sglang"] = "SGLang's MoE router is a BF16 parameter and its loader refuses quantized router weights"
    elif not recipe.get("fused_excludes", True) and {"dense_mlp", "shared_expert"} - quantized:
        verdicts["sglang"] = ("written without the fused module names (`--no-fused-excludes`): SGLang 0.5.13-0.5.23 "
                              "builds the BF16 `gate_up_proj` quantized and fails to load it")
    return verdicts


def serve_command(engine: str, model: str, trust_remote_code: bool) -> str:
    """The engines.yaml command of ``engine`` for ``model`` at TP=8, without the options requant's launcher
    fills for itself (host, port, served name, context length)."""
    spec = load_engines()[engine]
    own = {"{host}", "{port}", "{served_model_name}", "{max_model_len}"}
    parts, k = [], 0
    while k < len(spec.command):
        if k + 1 < len(spec.command) and spec.command[k].startswith("-") and spec.command[k + 1] in own:
            k += 2
            continue
        parts.append(spec.command[k].format(python="python", model=model, tp=SERVING_TP))
        k += 1
    if trust_remote_code and spec.trust_remote_code_flag:
        parts.append(spec.trust_remote_code_flag)
    return " ".join(parts)


def _serving(facts: CardFacts, by_class: dict[tuple[str, str], Tally]) -> list[str]:
    model, total = _model_name(facts), tensor_bytes(facts.manifest)
    remote = "auto_map" in facts.config
    lines = ["## Serving", "",
             f"Weights only, split evenly over TP={SERVING_TP}: **{_gib_per_gpu(total)}** ({total:,} bytes of tensor "
             f"data / {SERVING_TP}). Engines replicate a few small tensors (norms, routers) on every GPU, and the KV "
             "cache and activations come on top." + ("" if model != "MODEL" else
                                                    " `MODEL` is this repository's id or a local copy of it."), ""]
    names = {"vllm": "vLLM", "sglang": "SGLang", "atom": "ATOM (AMD, MI350X/MI355X)"}
    for engine, why_not in _engine_verdicts(facts, by_class).items():
        if why_not:
            lines += [f"**{names[engine]}**: not expected to load this checkpoint: {why_not}.", ""]
            continue
        note = " The seed card's engine; requant's tests do not run it." if engine == "atom" else ""
        lines += [f"**{names[engine]}**:{note}", "", "```bash", serve_command(engine, model, remote), "```", ""]
    if facts.manifest["recipe"]["format"] == "mxfp4":
        lines.append("vLLM runs Quark MXFP4 MoE natively on gfx950 (MI350X/MI355X) with AITER; on other GPUs it "
                     "emulates MXFP4 (dequantized weights), which is slower.")
    return lines


def _limitations(facts: CardFacts, by_class: dict[tuple[str, str], Tally]) -> list[str]:
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
    builtin = _builtin(m["recipe"])
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


def convert_command(manifest: dict[str, Any]) -> str:
    up, recipe = manifest["upstream"], manifest["recipe"]
    pinned = up.get("uri", "").startswith("hf://") and up.get("revision") not in (None, "local")
    src = f"hf://{up['id']}@{up['revision']}" if pinned else up.get("uri", "UPSTREAM")
    builtin = recipe.get("source") == f"builtin:{recipe['name']}"
    args = ["requant", "convert", src, f"out/{recipe['name']}", "--recipe",
            recipe["name"] if builtin else recipe.get("source", recipe["name"]),
            "--quark-version", recipe.get("quark_version", DEFAULT_QUARK)]
    if not recipe.get("fused_excludes", True):
        args.append("--no-fused-excludes")
    if manifest.get("unverified_inputs"):
        args.append("--unverified")
    if not pinned:
        args += ["--upstream-id", up.get("id", "?"), *(["--revision", up["revision"]] if up.get("revision") else [])]
    return " ".join(args)


def _reproduction(facts: CardFacts) -> list[str]:
    m = facts.manifest
    versions = ", ".join(f"{k} {v}" for k, v in sorted((m.get("versions") or {}).items()))
    lines = ["## Reproduction", "", f"Upstream: `{m['upstream'].get('id')}` at commit `{m['upstream'].get('revision')}`. "
             f"Converted with {versions}:", "", "```bash", convert_command(m), "```", "",
             f"The tensors equal AMD Quark {m['recipe'].get('quark_version', DEFAULT_QUARK)}'s file-to-file export of "
             "the same upstream byte for byte (requant's tests compare them with Quark's own output)."]
    quant = facts.config.get("quantization_config")
    if quant is not None:
        lines += ["", f"<details><summary>The <code>quantization_config</code> of <code>config.json</code> "
                      f"({len(quant.get('exclude', ()))} excluded modules)</summary>", "",
                  "```json", json.dumps(quant, indent=2), "```", "", "</details>"]
    builtin = _builtin(m["recipe"])
    if builtin and builtin[1].quark and m["recipe"]["format"] in FORMAT_LABELS:
        q = builtin[1].quark
        extra = f", layer_config {dict(q.layer_config)}" if q.layer_config else ""
        lines += ["", f"The Quark 0.11 equivalent (LLMTemplate `kimi_k25`): scheme `{q.scheme}`, exclude "
                      f"{', '.join(f'`{p}`' for p in q.exclude)}{extra}."]
    return lines


def _provenance(facts: CardFacts) -> list[str]:
    return ["## Provenance", "",
            f"`{MANIFEST_FILE}` records the upstream, the recipe, the library versions, every input's and output's size "
            f"and sha256, every tensor and the re-quantization error per module; it carries its own digest. "
            f"`requant verify {_model_name(facts)}` checks all of it, the `{EVAL_DIR}/` reports included. "
            f"The upstream model card is kept verbatim as `{UPSTREAM_CARD}`."]


def _licence_section(facts: CardFacts) -> list[str]:
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


def _citation(facts: CardFacts) -> list[str]:
    m = facts.manifest
    year = str(m.get("created", ""))[:4] or "n.d."
    version = (m.get("versions") or {}).get("requant", "unknown")
    return ["## Citation", "", f"To cite the model, cite `{m['upstream'].get('id')}` as its card asks (kept as "
            f"`{UPSTREAM_CARD}`). To cite the conversion:", "", "```bibtex", "@software{requant,",
            "  title = {requant: re-quantizing Kimi-K2.6-family MoE checkpoints to MXFP4 and FP8},",
            f"  version = {{{version}}},", f"  year = {{{year}}},", f"  note = {{recipe {m['recipe']['name']}}}",
            "}", "```"]
