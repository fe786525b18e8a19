"""Recipes are data: one YAML file each under requant/recipes/, checked against a JSON schema.

A recipe maps every tensor class of the layout (see :mod:`requant.layout`) to a target, and may override
single modules by name pattern. Targets may mix formats (e.g. MXFP4 experts with FP8 attention), the way
Quark expresses it: ``format`` is Quark's ``global_quant_config``; a class (or override) with another format
becomes a ``layer_quant_config`` entry under Quark's own pattern for it; unquantized modules are excluded.
A module's target is its first matching override, else its class's target, which is also how Quark resolves
the exported config (exclude first, then the first matching ``layer_quant_config`` pattern, then global).

The same file also says what the oracle and the test lanes need to know about the recipe (:class:`RecipeChecks`:
its Quark equivalent, the lanes that load it, where vLLM for CPUs stops). That is kept out of :class:`Recipe`, so
it is no part of a conversion or its run key: adding a built-in recipe is adding its file and nothing else.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from requant.errors import RequantError
from requant.export import ExportFormat, table_key
from requant.formats.table import (
    DEFAULT_QUARK,
    FORMAT_TABLES,
    NO_FORMAT,
    QUARK_VERSIONS,
    UNQUANTIZED,
)
from requant.layout import TENSOR_CLASSES, classify

FORMATS = tuple(dict.fromkeys(name for table in FORMAT_TABLES.values() for name in table))
TARGETS = (*FORMATS, UNQUANTIZED)
# Quark's file-to-file export never quantizes norms or embeddings, so a recipe may not either.
NEVER_QUANTIZED = ("norm", "embedding")
# Quark's pattern (as AMD writes them, e.g. `--layer_quant_scheme '*self_attn*' ptpc_fp8`) for each class that a
# layer_quant_config entry can select; fnmatch on module names, disjoint between classes.
QUARK_PATTERNS: dict[str, tuple[str, ...]] = {
    "routed_expert": ("*mlp.experts*",),
    "shared_expert": ("*shared_experts*",),
    "router": ("*mlp.gate",),
    "dense_mlp": ("*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj"),
    "attention": ("*self_attn*",),
    "lm_head": ("*lm_head",),
    "vision_tower": ("*vision_tower*",),
    "mm_projector": ("*mm_projector*",),
}
# The test lanes a recipe can be loaded in, beyond the conversion and Quark tests every built-in goes through:
# "engine" (tests/engine: SGLang's and vLLM's decisions per layer) and "trained" (tests/trained and
# dev/measure_trained.py: the trained model's smoke test and GSM8K gate).
LANES = ("engine", "trained")
# What a recipe does with a DeepSeek-V3/R1 multi-token-prediction layer (a decoder layer past num_hidden_layers):
# "keep" converts it like the others; "unquantized" keeps it with every tensor unquantized (as NVIDIA's Model
# Optimizer releases ship it: SGLang's NEXTN draft drops a Model Optimizer config for it); "drop" leaves it out.
MTP_CHOICES = ("keep", "unquantized", "drop")

def _equivalent_call(patterns: str, **optional: Any) -> dict[str, Any]:
    """The schema of what a maker's tool is given for a recipe's output: a scheme, a list of module patterns named
    ``patterns``, and ``optional`` keys."""
    return {"type": "object", "additionalProperties": False, "required": ["scheme", patterns],
            "properties": {"scheme": {"type": "string", "minLength": 1},
                           patterns: {"type": "array", "items": {"type": "string", "minLength": 1}}, **optional}}


SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "description", "format", "targets", "verify"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9.-]*$"},
        "description": {"type": "string", "minLength": 1},
        "format": {"enum": [*FORMATS, NO_FORMAT]},
        "targets": {
            "type": "object",
            "additionalProperties": False,
            "required": list(TENSOR_CLASSES),
            "properties": {cls: {"enum": list(TARGETS)} for cls in TENSOR_CLASSES},
        },
        "overrides": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["pattern", "target"],
                "properties": {"pattern": {"type": "string", "minLength": 1}, "target": {"enum": list(TARGETS)}},
            },
        },
        "verify": {
            "type": "object",
            "additionalProperties": False,
            "required": ["min_snr_db"],
            "properties": {"min_snr_db": {"type": ["number", "null"]}},
        },
        "warnings": {"type": "array", "items": {"type": "string"}},
        # the checkpoint format written (requant.export.ExportFormat): AMD Quark's export (default) or
        # compressed-tensors' as llm-compressor writes it
        "export": {"enum": [e.value for e in ExportFormat]},
        # with export quark, whose bytes the output reproduces: Quark 0.11.2's export (default) or Quark 0.13's
        "quark_version": {"enum": list(QUARK_VERSIONS)},
        # NVFP4 (compressed-tensors): one global scale per set of modules the engines fuse (default), or
        # llm-compressor's (false: one per module but for the dense MLP's gate_proj + up_proj)
        "shared_global_scale": {"type": "boolean"},
        # also exclude the engines' fused module names whose shards are all excluded (requant.export.quark.fused_excludes)
        "fused_excludes": {"type": "boolean"},
        # the multi-token-prediction layers (DeepSeek-V3's layer 61): converted like the others, kept with every
        # tensor unquantized, or left out of the output with num_nextn_predict_layers set to 0 (engines then serve
        # without MTP speculative decoding); MTP_CHOICES
        "mtp": {"enum": list(MTP_CHOICES)},
        # --- what the oracle and the test lanes need (RecipeChecks); no part of the conversion ---
        # the Quark 0.11 equivalent: what a Quark user passes to its file-to-file export for the same output
        # (LLMTemplate "kimi_k25"): the template scheme, the exclude patterns and layer_config {pattern: scheme}
        "quark_equivalent": _equivalent_call("exclude", layer_config={
            "type": "object", "additionalProperties": {"type": "string", "minLength": 1}}),
        # with export compressed-tensors, what an llm-compressor 0.14 user passes to model_free_ptq for the same
        # output: the preset scheme and the ignore list (in llm-compressor's own ``re:`` syntax)
        "llmcompressor_equivalent": _equivalent_call("ignore"),
        # with export modelopt, what a Model Optimizer 0.47 user passes to mtq.quantize for the same output: the
        # format (its quant_algo) and the quantizer-name patterns given it, between Model Optimizer's
        # base_disable_all and default_disabled_quantizers units
        "modelopt_equivalent": _equivalent_call("enable"),
        # the test lanes that load the recipe's output (default: all of LANES)
        "lanes": {"type": "array", "uniqueItems": True, "items": {"enum": list(LANES)}},
        # where vLLM for CPUs stops on the recipe's output (its stage and its message, or part of it); absent: it
        # serves it
        "vllm_cpu_stop": {
            "type": "object",
            "additionalProperties": False,
            "required": ["stage", "reason"],
            "properties": {"stage": {"type": "string", "minLength": 1}, "reason": {"type": "string", "minLength": 1}},
        },
    },
}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    format: str  # Quark's global format: a key of requant.formats.table.WEIGHT_FORMATS, or NO_FORMAT
    targets: tuple[tuple[str, str], ...]  # (tensor class, target), in layout order
    min_snr_db: float | None
    warnings: tuple[str, ...]
    source: str
    overrides: tuple[tuple[str, str], ...] = ()  # (module name pattern, target), first match wins
    quark_version: str = DEFAULT_QUARK  # the Quark release whose export the output equals (formats.table)
    fused_excludes: bool = True  # exclude also names SGLang's/vLLM's fused modules (requant.export.quark.fused_excludes)
    mtp: str = "keep"  # the MTP layers: converted like the others, kept unquantized, or left out (MTP_CHOICES)
    export: str = ExportFormat.QUARK.value  # the checkpoint format written (requant.export.ExportFormat)
    shared_global_scale: bool = True  # NVFP4: one global scale per set the engines fuse (export.compressed_tensors)

    @property
    def format_table(self) -> str:
        """The key of the format table whose bytes the output reproduces (requant.formats.table.FORMAT_TABLES)."""
        return table_key(self.export, self.quark_version)

    def target(self, tensor_class: str) -> str:
        return dict(self.targets)[tensor_class]

    def target_for(self, module: str, tensor_class: str | None = None, in_mtp_layer: bool = False) -> str:
        """The target of one module: unquantized in an MTP layer the recipe keeps unquantized, else its first
        matching override, else its tensor class's target."""
        if in_mtp_layer and self.mtp == "unquantized":
            return UNQUANTIZED
        return resolve_target(module, dict(self.targets), self.overrides, tensor_class)

    @property
    def formats(self) -> set[str]:
        return {t for _, t in (*self.targets, *self.overrides) if t != UNQUANTIZED}

    def layer_quant_patterns(self) -> list[tuple[str, str]]:
        """Quark ``layer_quant_config`` entries (pattern, format) in Quark's order of precedence: overrides
        first, then each class whose format is not the global one."""
        entries = [(p, t) for p, t in self.overrides if t != UNQUANTIZED]
        for cls, target in self.targets:
            if target not in (UNQUANTIZED, self.format):
                entries += [(p, target) for p in QUARK_PATTERNS[cls]]
        return entries

    @property
    def quantizes(self) -> bool:
        return self.format != NO_FORMAT


@dataclass(frozen=True)
class QuarkEquivalent:
    """What a Quark 0.11 user passes to Quark's file-to-file export for the output a recipe writes."""

    scheme: str                                   # LLMTemplate scheme, e.g. "mxfp4", "ptpc_fp8"
    exclude: tuple[str, ...]                      # exclude patterns, as AMD writes them
    layer_config: tuple[tuple[str, str], ...] = ()  # (pattern, scheme) entries of layer_config, in order

    def job(self, dst: str, **extra: str) -> dict[str, Any]:
        """One job of ``requant.testing.quark_reference``'s file-to-file script."""
        return {**extra, "dst": dst, "scheme": self.scheme, "exclude": list(self.exclude),
                "layer_config": dict(self.layer_config) or None}


@dataclass(frozen=True)
class LlmCompressorEquivalent:
    """What an llm-compressor 0.14 user passes to ``model_free_ptq`` for the output a recipe writes."""

    scheme: str              # preset scheme name, e.g. "MXFP4A16"
    ignore: tuple[str, ...]  # the ignore list, exact names and ``re:`` patterns as llm-compressor takes them


@dataclass(frozen=True)
class ModelOptEquivalent:
    """What a Model Optimizer 0.47 user passes to ``mtq.quantize`` for the output a recipe writes."""

    scheme: str              # the quant_algo, e.g. "W4A16_NVFP4"
    enable: tuple[str, ...]  # quantizer-name patterns given the format, after base_disable_all


@dataclass(frozen=True)
class RecipeChecks:
    """What the oracle and the test lanes know about a recipe, read from its file; not part of :class:`Recipe`, so
    no part of a conversion or its run key."""

    name: str
    quark: QuarkEquivalent | None  # None: no Quark equivalent stated (every built-in Quark export states one)
    lanes: tuple[str, ...]
    vllm_cpu_stop: tuple[str, str] | None  # (stage, reason); None: vLLM for CPUs serves the output
    llmcompressor: LlmCompressorEquivalent | None = None  # every built-in compressed-tensors export states one
    modelopt: ModelOptEquivalent | None = None  # every built-in Model Optimizer export states one


def resolve_target(module: str, targets: dict[str, str], overrides, tensor_class: str | None = None) -> str:
    """A module's target from class targets and (pattern, target) overrides (also as a manifest stores them)."""
    for pattern, target in overrides:
        if fnmatch.fnmatchcase(module, pattern):
            return target
    cls = tensor_class if tensor_class is not None else classify(module)
    return targets.get(cls, UNQUANTIZED) if cls else UNQUANTIZED


def builtin_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("requant.recipes").iterdir()
                  if p.name.endswith(".yaml") and p.name != "quark_schemes.yaml")


def load_recipe(name_or_path: str, quark_version: str | None = None, fused_excludes: bool | None = None,
                shared_global_scale: bool | None = None) -> Recipe:
    """A built-in recipe by name, or a YAML file by path; ``quark_version`` (``--quark-version``) overrides the
    recipe's own choice of the Quark release whose bytes the output reproduces, ``fused_excludes``
    (``--no-fused-excludes``) whether the exclude list also names the engines' fused modules, ``shared_global_scale``
    (``--no-shared-global-scale``) whether NVFP4 modules the engines fuse share one global scale."""
    recipe = _load_recipe(name_or_path)
    if quark_version is not None and quark_version != recipe.quark_version:
        if recipe.export != ExportFormat.QUARK:
            raise RequantError(f"quark version {quark_version!r}: recipe {recipe.name} writes {recipe.export}, "
                               "not a Quark export")
        if quark_version not in QUARK_VERSIONS:
            raise RequantError(f"quark version {quark_version!r}: requant reproduces {', '.join(QUARK_VERSIONS)}")
        recipe = dataclasses.replace(recipe, quark_version=quark_version)
    if fused_excludes is not None and fused_excludes != recipe.fused_excludes:
        recipe = dataclasses.replace(recipe, fused_excludes=fused_excludes)
    if shared_global_scale is not None and shared_global_scale != recipe.shared_global_scale:
        if recipe.export != ExportFormat.COMPRESSED_TENSORS:
            raise RequantError(f"--no-shared-global-scale: recipe {recipe.name} writes {recipe.export}; separate global "
                               "scales are llm-compressor's (compressed-tensors exports)")
        recipe = dataclasses.replace(recipe, shared_global_scale=shared_global_scale)
    return recipe


def load_checks(name_or_path: str) -> RecipeChecks:
    """What the oracle and the test lanes know about a built-in recipe (by name) or a recipe file (by path)."""
    return parse_checks(*_read(name_or_path))


def builtins_in(lane: str) -> list[str]:
    """The built-in recipes that the test lane ``lane`` (one of LANES) loads."""
    if lane not in LANES:
        raise RequantError(f"unknown test lane {lane!r}; lanes: {', '.join(LANES)}")
    return [name for name in builtin_names() if lane in load_checks(name).lanes]


def _read(name_or_path: str) -> tuple[Any, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text, source = path.read_text(), str(path)
    elif name_or_path in builtin_names():
        text = resources.files("requant.recipes").joinpath(f"{name_or_path}.yaml").read_text()
        source = f"builtin:{name_or_path}"
    else:
        raise RequantError(f"unknown recipe {name_or_path!r}; built-in: {', '.join(builtin_names())}, or a path to a .yaml file")
    return yaml.safe_load(text), source


def _load_recipe(name_or_path: str) -> Recipe:
    return parse_recipe(*_read(name_or_path))


def _validate(data: Any, source: str) -> None:
    try:
        jsonschema.validate(data, SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise RequantError(f"recipe {source}: {where}: {exc.message}") from exc


def parse_checks(data: Any, source: str) -> RecipeChecks:
    _validate(data, source)
    quark = data.get("quark_equivalent")
    llmc = data.get("llmcompressor_equivalent")
    mo = data.get("modelopt_equivalent")
    stop = data.get("vllm_cpu_stop")
    return RecipeChecks(
        name=data["name"],
        quark=QuarkEquivalent(quark["scheme"], tuple(quark["exclude"]),
                              tuple(quark.get("layer_config", {}).items())) if quark else None,
        llmcompressor=LlmCompressorEquivalent(llmc["scheme"], tuple(llmc["ignore"])) if llmc else None,
        modelopt=ModelOptEquivalent(mo["scheme"], tuple(mo["enable"])) if mo else None,
        lanes=tuple(data.get("lanes", LANES)),
        vllm_cpu_stop=(stop["stage"], stop["reason"]) if stop else None,
    )


def parse_recipe(data: Any, source: str) -> Recipe:
    _validate(data, source)
    targets = data["targets"]
    overrides = tuple((o["pattern"], o["target"]) for o in data.get("overrides", ()))
    used = {t for t in (*targets.values(), *(t for _, t in overrides)) if t != UNQUANTIZED}
    if data["format"] == NO_FORMAT and used:
        raise RequantError(f"recipe {source}: format is none but targets use {sorted(used)}")
    if data["format"] != NO_FORMAT and data["format"] not in used:
        raise RequantError(f"recipe {source}: the global format {data['format']!r} is not the target of any class "
                           f"or override (targets use {sorted(used) or 'nothing'})")
    for cls in NEVER_QUANTIZED:
        if targets[cls] != UNQUANTIZED:
            raise RequantError(f"recipe {source}: {cls} cannot be quantized (Quark's export keeps norms and embeddings)")
    export = data.get("export", ExportFormat.QUARK.value)
    _check_export(data, source, export, used, overrides)
    return Recipe(
        name=data["name"],
        description=data["description"].strip(),
        format=data["format"],
        targets=tuple((cls, targets[cls]) for cls in TENSOR_CLASSES),
        min_snr_db=data["verify"]["min_snr_db"],
        warnings=tuple(data.get("warnings", ())),
        source=source,
        overrides=overrides,
        quark_version=data.get("quark_version", DEFAULT_QUARK),
        fused_excludes=data.get("fused_excludes", True),
        mtp=data.get("mtp", "keep"),
        export=export,
        shared_global_scale=data.get("shared_global_scale", True),
    )


def _check_export(data: dict[str, Any], source: str, export: str, used: set[str], overrides) -> None:
    """What a recipe's checkpoint format can express: its formats are in its table; a compressed-tensors export
    takes no Quark release, no overrides (its ignore list is written per tensor class) and one format."""
    table = FORMAT_TABLES[table_key(export, data.get("quark_version", DEFAULT_QUARK))]
    if missing := sorted(used - set(table)):
        raise RequantError(f"recipe {source}: export {export} has no format {', '.join(missing)} "
                           f"(it writes {', '.join(table)})")
    if export == ExportFormat.QUARK:
        if "shared_global_scale" in data:
            raise RequantError(f"recipe {source}: shared_global_scale applies to compressed-tensors exports (NVFP4)")
        return
    for key in ("quark_version", "quark_equivalent", "fused_excludes"):
        if key in data:
            raise RequantError(f"recipe {source}: {key} applies to Quark exports, not to export {export}")
    for key, owner in (("llmcompressor_equivalent", ExportFormat.COMPRESSED_TENSORS),
                       ("modelopt_equivalent", ExportFormat.MODELOPT)):
        if key in data and export != owner:
            raise RequantError(f"recipe {source}: {key} applies to {owner} exports, not to export {export}")
    if export == ExportFormat.MODELOPT and data.get("shared_global_scale") is False:
        raise RequantError(f"recipe {source}: export modelopt shares each fused set's weight_scale_2 as Model "
                           "Optimizer does; shared_global_scale: false applies to compressed-tensors exports")
    if overrides:
        raise RequantError(f"recipe {source}: export {export} takes no overrides (its ignore list is written per "
                           "tensor class)")
    if export == ExportFormat.COMPRESSED_TENSORS and data.get("mtp") == "unquantized":
        raise RequantError(f"recipe {source}: mtp: unquantized applies to Quark and Model Optimizer exports, whose "
                           "exclude lists name modules; compressed-tensors' ignore list is written per tensor class")
    if len(used) > 1:
        raise RequantError(f"recipe {source}: export {export} writes one format, the recipe uses {sorted(used)}")


@lru_cache(maxsize=1)
def quark_schemes() -> dict[str, Any]:
    return yaml.safe_load(resources.files("requant.recipes").joinpath("quark_schemes.yaml").read_text())
