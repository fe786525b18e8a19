"""Recipes are data: one YAML file each under requant/recipes/, checked against a JSON schema.

A recipe maps every tensor class of the layout (see :mod:`requant.layout`) to a target. At most one
quantized format per recipe, because Quark's exported config carries one global scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from requant.errors import RequantError
from requant.formats.table import NO_FORMAT, UNQUANTIZED, WEIGHT_FORMATS
from requant.layout import TENSOR_CLASSES

FORMATS = tuple(WEIGHT_FORMATS)
TARGETS = (*FORMATS, UNQUANTIZED)
# Quark's file-to-file export never quantizes norms or embeddings, so a recipe may not either.
NEVER_QUANTIZED = ("norm", "embedding")

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
        "verify": {
            "type": "object",
            "additionalProperties": False,
            "required": ["min_snr_db"],
            "properties": {"min_snr_db": {"type": ["number", "null"]}},
        },
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    format: str  # a key of requant.formats.table.WEIGHT_FORMATS, or NO_FORMAT
    targets: tuple[tuple[str, str], ...]  # (tensor class, target), in layout order
    min_snr_db: float | None
    warnings: tuple[str, ...]
    source: str

    def target(self, tensor_class: str) -> str:
        return dict(self.targets)[tensor_class]

    @property
    def quantizes(self) -> bool:
        return self.format != NO_FORMAT


def builtin_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("requant.recipes").iterdir()
                  if p.name.endswith(".yaml") and p.name != "quark_schemes.yaml")


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text, source = path.read_text(), str(path)
    elif name_or_path in builtin_names():
        text = resources.files("requant.recipes").joinpath(f"{name_or_path}.yaml").read_text()
        source = f"builtin:{name_or_path}"
    else:
        raise RequantError(f"unknown recipe {name_or_path!r}; built-in: {', '.join(builtin_names())}, or a path to a .yaml file")
    return parse_recipe(yaml.safe_load(text), source)


def parse_recipe(data: Any, source: str) -> Recipe:
    try:
        jsonschema.validate(data, SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise RequantError(f"recipe {source}: {where}: {exc.message}") from exc
    targets = data["targets"]
    used = {t for t in targets.values() if t != UNQUANTIZED}
    if data["format"] == NO_FORMAT and used:
        raise RequantError(f"recipe {source}: format is none but classes target {sorted(used)}")
    if data["format"] != NO_FORMAT and used != {data["format"]}:
        raise RequantError(f"recipe {source}: targets use {sorted(used)}; exactly the declared format {data['format']!r} is allowed")
    for cls in NEVER_QUANTIZED:
        if targets[cls] != UNQUANTIZED:
            raise RequantError(f"recipe {source}: {cls} cannot be quantized (Quark's export keeps norms and embeddings)")
    return Recipe(
        name=data["name"],
        description=data["description"].strip(),
        format=data["format"],
        targets=tuple((cls, targets[cls]) for cls in TENSOR_CLASSES),
        min_snr_db=data["verify"]["min_snr_db"],
        warnings=tuple(data.get("warnings", ())),
        source=source,
    )


@lru_cache(maxsize=1)
def quark_schemes() -> dict[str, Any]:
    return yaml.safe_load(resources.files("requant.recipes").joinpath("quark_schemes.yaml").read_text())
