"""The checkpoint formats requant writes, one module each: the ``quantization_config`` a maker's tool writes for a
recipe, and what the output's config.json carries from the upstream. The tensors of each are rows of
:data:`requant.formats.table.FORMAT_TABLES` (a recipe picks its table with :attr:`requant.recipe.Recipe.format_table`).

* :mod:`requant.export.quark`: AMD Quark's file-to-file export (0.11.2 or 0.13), ``quant_method: quark``.
* :mod:`requant.export.compressed_tensors`: compressed-tensors 0.19 as llm-compressor 0.14's ``model_free_ptq``
  writes it, ``quant_method: compressed-tensors``.
* :mod:`requant.export.modelopt`: NVIDIA Model Optimizer 0.47's unified Hugging Face export, ``hf_quant_config.json``
  and ``quant_method: modelopt``.
* :mod:`requant.export.global_scales`: which modules share one NVFP4 global scale.
* :mod:`requant.export.config`: the output config.json and the files beside it, through the recipe's writer.

This module names them and their makers without importing the writers (the recipe schema reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from requant.constants import COMPRESSED_TENSORS_VERSION, DEFAULT_QUARK, MODELOPT_VERSION
from requant.formats.table import COMPRESSED_TENSORS_TABLE, FORMAT_TABLES, MODELOPT_TABLE, WeightFormat, quark_table


class ExportFormat(StrEnum):
    """A recipe's ``export``: whose checkpoint format the output is written in."""

    QUARK = "quark"
    COMPRESSED_TENSORS = "compressed-tensors"
    MODELOPT = "modelopt"


@dataclass(frozen=True)
class Maker:
    """Whose tool writes an export format: its table of formats (None: one per Quark release) and its name for
    people."""

    table: str | None
    name: str


MAKERS: dict[ExportFormat, Maker] = {
    ExportFormat.QUARK: Maker(None, "AMD Quark"),
    ExportFormat.COMPRESSED_TENSORS: Maker(COMPRESSED_TENSORS_TABLE,
                                           f"llm-compressor 0.14 (compressed-tensors {COMPRESSED_TENSORS_VERSION})"),
    ExportFormat.MODELOPT: Maker(MODELOPT_TABLE, f"NVIDIA Model Optimizer {MODELOPT_VERSION}"),
}


@dataclass(frozen=True)
class OutputModules:
    """The modules of an output that the writers' configs name (from :func:`requant.planning.output_modules`)."""

    quantized: tuple[str, ...]  # stored quantized
    excluded: tuple[str, ...]  # Quark's ``exclude``: linear weights left unquantized (Plan.excluded_modules)
    unquantized: tuple[str, ...]  # every module with a weight of two or more dimensions left as it is (norms aside)


def table_key(export: str, quark_version: str = DEFAULT_QUARK) -> str:
    """The :data:`requant.formats.table.FORMAT_TABLES` key of an export format (a Quark export: of its release)."""
    return MAKERS[ExportFormat(export)].table or quark_table(quark_version)


def recorded_export(recipe: dict[str, Any]) -> ExportFormat:
    """The export format of a recipe as a manifest records it (one from before ``export`` was recorded is Quark's)."""
    return ExportFormat(recipe.get("export", ExportFormat.QUARK))


def recorded_table(recipe: dict[str, Any]) -> dict[str, WeightFormat]:
    """The format table of a recipe as a manifest records it."""
    return FORMAT_TABLES[table_key(recorded_export(recipe), recipe.get("quark_version", DEFAULT_QUARK))]


def maker(recipe: dict[str, Any]) -> str:
    """Whose output a recipe (as a manifest records it) reproduces byte for byte, for people: "AMD Quark 0.11"."""
    export = recorded_export(recipe)
    if export == ExportFormat.QUARK:
        return f"AMD Quark {recipe.get('quark_version', DEFAULT_QUARK)}"
    return MAKERS[export].name


def container(recipe: dict[str, Any]) -> str:
    """The checkpoint format a recipe (as a manifest records it) writes, for people."""
    export = recorded_export(recipe)
    if export == ExportFormat.QUARK:
        return f"{maker(recipe)}'s `real_quantized` export format"
    if export == ExportFormat.MODELOPT:
        return f"{maker(recipe)}'s unified Hugging Face checkpoint format"
    return f"compressed-tensors' format as {maker(recipe).split(' (')[0]} writes it"
