"""What a model card derives from its facts: what is stored how (tensors, parameters, bytes), sizes and labels,
the verdict, the licence and the metadata block; and the tables of wording they draw on."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from requant.card.facts import CardFacts
from requant.errors import RequantError
from requant.export import recorded_table
from requant.io.safetensors import tensor_nbytes
from requant.layout import classify
from requant.manifest import MANIFEST_FILE
from requant.recipe import RecipeChecks, builtin_names, load_checks, load_recipe, resolve_target

SERVING_TP = 8  # one 8-GPU node (MI355X / H200 class), as the published Kimi MXFP4 cards serve it
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
    "mtp_projection": "the MTP layer's `eh_proj`; vLLM and SGLang build it unquantized",
}



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
    formats = recorded_table(recipe)
    overrides = [tuple(o) for o in recipe.get("overrides", ())]
    by_storage: dict[str, Tally] = defaultdict(Tally)
    by_class: dict[tuple[str, str], Tally] = defaultdict(Tally)
    for name, entry in tensors.items():
        module, _, param = name.rpartition(".")
        found = classify(module)
        cls, fmt = found or "other", None
        if param in ("weight", "weight_packed", "weight_scale") and f"{module}.weight_scale" in tensors:
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


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def label(storage: str) -> str:
    return FORMAT_LABELS.get(storage, storage)


def size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def gib_per_gpu(total: int) -> str:
    return f"{total / SERVING_TP / 2**30:.2f} GiB per GPU"


def builtin_recipe(recipe: dict[str, Any]) -> tuple[str, RecipeChecks] | None:
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
    link = facts.license_file or meta.get("license_link") or hub_url(upstream_id)
    fields = {"license": "other", "license_name": str(meta.get("license_name") or slug)}
    return {**fields, "license_link": str(link)} if link else fields


def hub_url(repo_id: str) -> str | None:
    return f"https://huggingface.co/{repo_id}" if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) else None


def metadata(facts: CardFacts, by_storage: dict[str, Tally]) -> dict[str, Any]:
    recipe = facts.manifest["recipe"]
    quantized = [s for s in by_storage if s in FORMAT_LABELS]
    quant_method = (facts.config.get("quantization_config") or {}).get("quant_method")
    tags = [*(s.split("_")[0] for s in sorted(quantized)), *([quant_method] if isinstance(quant_method, str) else []),
            recipe["name"], "requant", "moe"]
    return {"base_model": facts.manifest["upstream"].get("id"), "base_model_relation": "quantized", **licence(facts),
            "library_name": "transformers", "pipeline_tag": "text-generation", "tags": list(dict.fromkeys(tags))}


def model_name(facts: CardFacts) -> str:
    release = facts.release
    return release.repo_id if release and release.repo_id else "MODEL"
