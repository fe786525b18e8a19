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
