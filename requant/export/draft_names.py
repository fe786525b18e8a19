"""The names SGLang's MTP draft model gives a checkpoint's multi-token-prediction layers, which an exclude list must
use for the draft model to leave those modules unquantized.

SGLang's NextN draft model (``--speculative-algorithm NEXTN``, DeepseekV3ForCausalLMNextN) builds an MTP layer
``P.layers.N`` (N = num_hidden_layers) as a model of its own: its decoder block as ``P.decoder``, its projection as
``P.eh_proj``, its head as ``P.shared_head.head``. It renames the exclude list's ``model.layers.61`` (DeepSeek-V3/R1's
N) to ``model.decoder`` and nothing else. Under a Quark config it asks the config about the block and eh_proj by
those names; under a Model Optimizer config it drops the config for the block (NVIDIA's releases keep the MTP layer
BF16) and builds eh_proj as a plain Linear, but asks the checkpoint's config about the head.
"""

from __future__ import annotations

MTP_MARKER = "eh_proj"  # a module only MTP layers have
DRAFT_BLOCK = "decoder"
DRAFT_HEAD = "shared_head.head"


def _mtp_layers(modules: set[str]) -> set[str]:
    """The MTP layers ``P.layers.N`` among ``modules``: those with an ``eh_proj``."""
    return {name.removesuffix(f".{MTP_MARKER}") for name in modules if name.endswith(f".{MTP_MARKER}")
            and name.rsplit(".", 3)[-3] == "layers"}


def _model(layer: str) -> str:
    """P of an MTP layer ``P.layers.N``: "model" (or a VLM's "language_model.model")."""
    return layer.rsplit(".", 2)[0]


def mtp_draft_names(excluded: set[str]) -> set[str]:
    """For each MTP layer (a ``P.layers.N`` with an excluded ``eh_proj``): ``P.eh_proj``, and ``P.decoder.X`` for
    each excluded ``P.layers.N.X`` of its decoder block (its embedding and shared head are never asked about by
    these names)."""
    names = set()
    for layer in _mtp_layers(excluded):
        model = _model(layer)
        names.add(f"{model}.{MTP_MARKER}")
        for name in excluded:
            rest = name.removeprefix(f"{layer}.")
            if rest != name and not rest.startswith((MTP_MARKER, "shared_head.", "embed_tokens")):
                names.add(f"{model}.{DRAFT_BLOCK}.{rest}")
    return names


def draft_head_names(unquantized: set[str]) -> set[str]:
    """``P.shared_head.head`` for each MTP layer ``P.layers.N`` whose head is among the ``unquantized`` modules."""
    return {f"{_model(layer)}.{DRAFT_HEAD}" for layer in _mtp_layers(unquantized)
            if f"{layer}.{DRAFT_HEAD}" in unquantized}
