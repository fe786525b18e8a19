"""The card's Serving section: which engines are expected to load the checkpoint, and their commands."""

from __future__ import annotations

from requant.card.derived import FORMAT_LABELS, SERVING_TP, Tally, gib_per_gpu, model_name, tensor_bytes
from requant.card.facts import CardFacts
from requant.engines.engines import load_engines


def engine_verdicts(facts: CardFacts, by_class: dict[tuple[str, str], Tally]) -> dict[str, str | None]:
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


def section(facts: CardFacts, by_class: dict[tuple[str, str], Tally]) -> list[str]:
    model, total = model_name(facts), tensor_bytes(facts.manifest)
    remote = "auto_map" in facts.config
    lines = ["## Serving", "",
             f"Weights only, split evenly over TP={SERVING_TP}: **{gib_per_gpu(total)}** ({total:,} bytes of tensor "
             f"data / {SERVING_TP}). Engines replicate a few small tensors (norms, routers) on every GPU, and the KV "
             "cache and activations come on top." + ("" if model != "MODEL" else
                                                    " `MODEL` is this repository's id or a local copy of it."), ""]
    names = {"vllm": "vLLM", "sglang": "SGLang", "atom": "ATOM (AMD, MI350X/MI355X)"}
    for engine, why_not in engine_verdicts(facts, by_class).items():
        if why_not:
            lines += [f"**{names[engine]}**: not expected to load this checkpoint: {why_not}.", ""]
            continue
        note = " The seed card's engine; requant's tests do not run it." if engine == "atom" else ""
        lines += [f"**{names[engine]}**:{note}", "", "```bash", serve_command(engine, model, remote), "```", ""]
    if facts.manifest["recipe"]["format"] == "mxfp4":
        lines.append("vLLM runs Quark MXFP4 MoE natively on gfx950 (MI350X/MI355X) with AITER; on other GPUs it "
                     "emulates MXFP4 (dequantized weights), which is slower.")
    return lines
