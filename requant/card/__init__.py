"""The model card (``README.md``) of a converted checkpoint, rendered from facts, never typed by hand.

:class:`CardFacts` gathers what a checkpoint says about itself: its manifest (upstream, recipe, versions, files,
tensors, SNR), its ``config.json``, the upstream's licence file and card metadata (both copied verbatim), and the
evaluation published under ``eval/``; :func:`render_card` turns them into a Hub card with its metadata block.
Conversion renders the card without an evaluation, ``publish_evaluation`` renders it again once the report lands,
and the release step renders it with :class:`ReleaseFacts`; nothing else writes a card.
"""

from __future__ import annotations

import yaml

from requant.card import reproduction, sections, serving
from requant.card.derived import (
    FORMAT_DETAILS,
    FORMAT_LABELS,
    KEPT_WHY,
    SERVING_TP,
    Tally,
    coverage,
    licence,
    metadata,
    tensor_bytes,
    verdict,
)
from requant.card.facts import LICENSE_FILE, CardFacts, ReleaseFacts, front_matter
from requant.card.reproduction import convert_command
from requant.card.serving import serve_command

__all__ = ["FORMAT_DETAILS", "FORMAT_LABELS", "KEPT_WHY", "LICENSE_FILE", "SERVING_TP", "CardFacts", "ReleaseFacts",
           "Tally", "convert_command", "coverage", "front_matter", "licence", "metadata", "render_card",
           "serve_command", "tensor_bytes", "verdict"]


def render_card(facts: CardFacts) -> str:
    by_storage, by_class = coverage(facts.manifest)
    yaml_block = yaml.safe_dump(metadata(facts, by_storage), sort_keys=False, allow_unicode=True).strip()
    parts = [sections.title(facts), sections.overview(facts, by_storage),
             sections.coverage(facts, by_storage, by_class), sections.quality(facts),
             sections.architecture(facts, by_storage, by_class), serving.section(facts, by_class),
             sections.limitations(facts, by_class), reproduction.section(facts), sections.provenance(facts),
             sections.licence_and_attribution(facts), sections.citation(facts)]
    return f"---\n{yaml_block}\n---\n\n" + "\n\n".join("\n".join(s).strip("\n") for s in parts) + "\n"
