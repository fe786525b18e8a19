"""A serving engine's per-layer quantization decisions, compared with what a recipe intends.

The engines' own code decides (vLLM through :mod:`requant.engines.vllm_probe`, SGLang through
:mod:`requant.engines.sglang_decide`); this module only names each engine layer's tensor class and sets the
decisions side by side with the recipe's targets, given the engine's ``intended(target, layer)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from requant.export import ExportFormat
from requant.export.quark import ENGINE_FUSED_MODULES
from requant.layout import classify


@dataclass(frozen=True)
class Layer:
    prefix: str               # the engine's module name, e.g. language_model.model.layers.1.mlp.experts
    layer_type: str           # the engine's class, e.g. GateLinear, MergedColumnParallelLinear, RoutedExperts
    tensor_class: str | None  # requant's class of the checkpoint tensors it holds (routed_expert, router, ...)
    quant_method: str | None
    scheme: str | None
    target: str | None        # what vLLM's QuarkConfig.get_quant_method_target chose, when it was asked
    weight_key: str | None
    error: str | None
    built: bool = True        # False: the engine stopped before building it; decided by its live config


@dataclass
class Probe:
    layers: list[Layer] = field(default_factory=list)
    stopped: dict | None = None  # {"stage", "where", "error"} when start-up failed
    ready: bool = False

    def decision(self, layer: Layer) -> str:
        return layer.quant_method if layer.scheme is None else f"{layer.quant_method}/{layer.scheme}"


# vLLM's DeepSeekMTP names an MTP layer's head ``model.layers.N.head`` (the checkpoint's ``shared_head.head``).
VLLM_MTP_HEAD = re.compile(r"\.layers\.\d+\.head$")


def tensor_class(prefix: str) -> str | None:
    """requant's tensor class of an engine module, from the checkpoint names its fused layers stand for (SGLang's
    MTP draft names, ``model.decoder.*`` and ``model.eh_proj``, classify as they are)."""
    name = prefix
    if VLLM_MTP_HEAD.search(name):
        name = name.removesuffix("head") + "shared_head.head"
    if name.endswith(".mlp.experts"):
        name += ".0.gate_proj"
    parent, _, last = name.rpartition(".")
    if last in ENGINE_FUSED_MODULES:
        name = f"{parent}.{ENGINE_FUSED_MODULES[last][0]}"
    return classify(name)


# Model Optimizer's config gives an excluded ParallelLMHead the unquantized linear method (vLLM's and SGLang's alike).
UNQUANTIZED_LM_HEAD = {ExportFormat.MODELOPT: "UnquantizedLinearMethod"}


def embedding_method(target: str, layer: Layer, export: ExportFormat) -> str:
    """The method vLLM and SGLang give an embedding or lm_head (VocabParallelEmbedding, ParallelLMHead) a recipe of
    ``export`` maps to ``target``."""
    if target != "unquantized":
        return f"a {target} embedding method"
    if layer.layer_type == "ParallelLMHead":
        return UNQUANTIZED_LM_HEAD.get(export, "UnquantizedEmbeddingMethod")
    return "UnquantizedEmbeddingMethod"


Intended = Callable[[str, Layer], str]  # (a recipe's target, an engine layer) -> the decision the engine should make
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Targets:
    """A recipe's targets for an engine's layers: its tensor classes' (``classes``, a manifest's recipe targets),
    but unquantized for every layer of an MTP layer the recipe keeps so (``mtp: unquantized``). ``mtp_from``: the
    checkpoint's ``num_hidden_layers``, the first MTP layer's index; ``draft``: the layers are SGLang's MTP draft
    model's, all of them the MTP layer's."""

    classes: dict[str, str]
    mtp: str = "keep"
    mtp_from: int | None = None
    draft: bool = False

    @classmethod
    def of(cls, recipe: dict, config: dict, draft: bool = False) -> Targets:
        """From a recipe as a manifest records it and the checkpoint's config.json."""
        text = config.get("text_config") or config
        return cls(dict(recipe["targets"]), recipe.get("mtp", "keep"), text.get("num_hidden_layers"), draft)

    def in_unquantized_mtp(self, layer: Layer) -> bool:
        if self.mtp != "unquantized":
            return False
        index = LAYER_INDEX.search(layer.prefix + ".")
        return self.draft or (index is not None and self.mtp_from is not None and int(index[1]) >= self.mtp_from)

    def target(self, layer: Layer) -> str:
        if self.in_unquantized_mtp(layer):
            return "unquantized"
        return self.classes.get(layer.tensor_class or "", "unquantized")


def summarize(probe: Probe, targets: Targets | dict[str, str], intended: Intended, served: bool | None = None) -> dict:
    """Per tensor class (an unquantized MTP layer's apart): the recipe's target, the engine's layer types and
    decisions, the intended decisions; and every layer where the two differ. ``targets``: :class:`Targets`, or a
    manifest's recipe targets per tensor class."""
    if not isinstance(targets, Targets):
        targets = Targets(dict(targets))
    classes: dict[str, dict] = {}
    mismatches = []
    for layer in probe.layers:
        target = targets.target(layer)
        want = intended(target, layer)
        # A layer whose constructor failed still had its method chosen by the config (``target``).
        got = probe.decision(layer) if layer.error is None else (layer.target or "none")
        row_name = (layer.tensor_class or "unknown") + (" (MTP)" if targets.in_unquantized_mtp(layer) else "")
        row = classes.setdefault(row_name, {"target": target, "layers": 0, "not_built": 0,
                                            "types": [], "decisions": [], "intended": []})
        row["layers"] += 1
        row["not_built"] += not layer.built
        shown = got if layer.error is None else f"{got}, not built: {layer.error.split(':', 1)[0]}"
        for key, value in (("types", layer.layer_type), ("decisions", shown), ("intended", want)):
            if value not in row[key]:
                row[key].append(value)
        if layer.tensor_class is None or got != want:
            mismatches.append({"prefix": layer.prefix, "tensor_class": layer.tensor_class, "engine": got,
                               "recipe": want})
    return {"served": probe.ready if served is None else served, "stopped": probe.stopped, "classes": classes,
            "mismatches": mismatches}


def format_summary(summary: dict, engine: str, ready: str = "served") -> str:
    """The per-class table; the last line says whether the engine got to ``ready`` (served, loaded) or where it
    stopped."""
    width = max([14, *map(len, summary["classes"])])
    lines = [f"{'tensor class':{width}s} {'recipe':16s} {'layers':>6s} {'built':>5s}  {engine}'s decision (layer types)"]
    for name, row in summary["classes"].items():
        chosen = {d.split(", not built")[0] for d in row["decisions"]}
        flag = "" if chosen <= set(row["intended"]) else "   <-- differs from the recipe"
        built = row["layers"] - row["not_built"]
        lines.append(f"{name:{width}s} {row['target']:16s} {row['layers']:6d} {built:5d}  {', '.join(row['decisions'])} "
                     f"({', '.join(row['types'])}){flag}")
    stopped = summary["stopped"]
    if any(row["not_built"] for row in summary["classes"].values()):
        lines.append(f"(layers {engine} did not build were decided by its live config when start-up stopped)")
    if summary["served"] is None and not stopped:
        lines.append(f"{ready}: not tried")
        return "\n".join(lines)
    lines.append(f"{ready}: yes" if summary["served"] else
                 f"stopped at {stopped['stage']}" + (f" ({stopped['where']})" if stopped.get("where") else "") +
                 f": {stopped['error'][:400]}" if stopped else f"{ready}: no (no failure recorded)")
    return "\n".join(lines)
