"""The checkpoint formats requant writes, one module each: the ``quantization_config`` a maker's tool writes for a
recipe, and what the output's config.json carries from the upstream. The tensors of each are rows of
:data:`requant.formats.table.FORMAT_TABLES` (a recipe picks its table with :attr:`requant.recipe.Recipe.format_table`).

* :mod:`requant.export.quark`: AMD Quark's file-to-file export (0.11.2 or 0.13), ``quant_method: quark``.
* :mod:`requant.export.compressed_tensors`: compressed-tensors 0.19 as llm-compressor 0.14's ``model_free_ptq``
  writes it, ``quant_method: compressed-tensors``.
* :mod:`requant.export.config`: the output config.json, through the recipe's writer.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from requant.constants import COMPRESSED_TENSORS_VERSION, DEFAULT_QUARK
from requant.formats.table import COMPRESSED_TENSORS_TABLE, FORMAT_TABLES, WeightFormat, quark_table


class ExportFormat(StrEnum):
    """A recipe's ``export``: whose checkpoint format the output is written in."""

    QUARK = "quark"
    COMPRESSED_TENSORS = "compressed-tensors"


def table_key(export: str, quark_version: str = DEFAULT_QUARK) -> str:
    """The :data:`requant.formats.table.FORMAT_TABLES` key of an export format (a Quark export: of its release)."""
    return COMPRESSED_TENSORS_TABLE if export == ExportFormat.COMPRESSED_TENSORS else quark_table(quark_version)


def recorded_table(recipe: dict[str, Any]) -> dict[str, WeightFormat]:
    """The format table of a recipe as a manifest records it (a manifest from before ``export`` was recorded is a
    Quark export's)."""
    return FORMAT_TABLES[table_key(recipe.get("export", ExportFormat.QUARK), recipe.get("quark_version", DEFAULT_QUARK))]


def maker(recipe: dict[str, Any]) -> str:
    """Whose output a recipe (as a manifest records it) reproduces byte for byte, for people: "AMD Quark 0.11"."""
    if recipe.get("export", ExportFormat.QUARK) == ExportFormat.COMPRESSED_TENSORS:
        return f"llm-compressor 0.14 (compressed-tensors {COMPRESSED_TENSORS_VERSION})"
    return f"AMD Quark {recipe.get('quark_version', DEFAULT_QUARK)}"


def container(recipe: dict[str, Any]) -> str:
    """The checkpoint format a recipe (as a manifest records it) writes, for people."""
    if recipe.get("export", ExportFormat.QUARK) == ExportFormat.COMPRESSED_TENSORS:
        return f"compressed-tensors' format as {maker(recipe).split(' (')[0]} writes it"
    return f"{maker(recipe)}'s `real_quantized` export format"
