"""Reading a checkpoint's tensors for byte-for-byte comparisons with an oracle's output (the safetensors library
reads them, not requant)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in ``directory``, by name."""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, whatever its dtype."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def engine_fused_names(exclude: list[str]) -> list[str]:
    """The names requant adds to Quark's ``exclude`` (written out here, not taken from requant): the fused modules
    SGLang and vLLM build whose every shard Quark excluded."""
    names, added = set(exclude), set()
    for name in names:
        parent = name.rsplit(".", 1)[0]
        if name.endswith(".gate_proj") and f"{parent}.up_proj" in names:
            added.add(f"{parent}.gate_up_proj")
        if name.endswith(".q_a_proj") and f"{parent}.kv_a_proj_with_mqa" in names:
            added |= {f"{parent}.fused_qkv_a_proj", f"{parent}.fused_qkv_a_proj_with_mqa"}
    return sorted(added - names)
