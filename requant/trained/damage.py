"""Deliberately damaged conversions: what a converter bug would publish, to prove the downstream gate catches it.

Each damage rewrites some tensors of a finished MXFP4 checkpoint (a local folder) into a copy and reseals the
copy's manifest, as a buggy converter would have sealed its own output: ``requant verify`` cannot tell, so only
the smoke test and the GSM8K gate stand between it and a release.

- ``scales-x2``: every routed expert's MXFP4 scale one exponent too high (E8M0 byte + 1: weights doubled);
- ``nibbles-swapped``: every routed expert's two E2M1 codes per byte in the wrong order (within a block, each
  pair of neighbouring weights exchanged);
- ``router-zeroed``: the first MoE layer's router weight all zero (every token routed by the correction bias
  alone, to the same experts).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from requant.errors import RequantError
from requant.io.safetensors import sha256_file
from requant.manifest import MANIFEST_FILE, seal

ROUTED = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.")


def _scales_x2(name: str, t: torch.Tensor) -> torch.Tensor | None:
    if ROUTED.search(name) and name.endswith(".weight_scale") and t.dtype == torch.uint8:
        return (t.to(torch.int16) + 1).clamp(max=254).to(torch.uint8)
    return None


def _nibbles_swapped(name: str, t: torch.Tensor) -> torch.Tensor | None:
    if ROUTED.search(name) and name.endswith(".weight") and t.dtype == torch.uint8:
        return ((t & 0x0F) << 4) | (t >> 4)
    return None


def _router_zeroed(name: str, t: torch.Tensor, layer: int) -> torch.Tensor | None:
    if re.search(rf"\.layers\.{layer}\.mlp\.gate\.weight$", name):
        return torch.zeros_like(t)  # E2M1 code 0 and BF16 0 are both +0
    return None


def _first_moe_layer(root: Path) -> int:
    text = json.loads((root / "config.json").read_text())
    text = text.get("text_config", text)
    return int(text.get("first_k_dense_replace", 0))


DAMAGES: dict[str, str] = {
    "scales-x2": "routed experts' MXFP4 scales one exponent too high",
    "nibbles-swapped": "routed experts' FP4 nibbles swapped in every byte",
    "router-zeroed": "the first MoE layer's router zeroed",
}


def damage(src: str | Path, dst: str | Path, kind: str) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with damage ``kind`` (a key of DAMAGES) and a resealed manifest."""
    src, dst = Path(src), Path(dst)
    if kind not in DAMAGES:
        raise RequantError(f"unknown damage {kind!r}; one of {', '.join(DAMAGES)}")
    edit: Callable[[str, torch.Tensor], torch.Tensor | None]
    if kind == "scales-x2":
        edit = _scales_x2
    elif kind == "nibbles-swapped":
        edit = _nibbles_swapped
    else:
        layer = _first_moe_layer(src)
        edit = lambda name, t: _router_zeroed(name, t, layer)  # noqa: E731
    shutil.copytree(src, dst)
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    changed = 0
    for shard in sorted(dst.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        edits = {name: new for name, t in tensors.items() if (new := edit(name, t)) is not None}
        if not edits:
            continue
        changed += len(edits)
        save_file({**tensors, **edits}, str(shard), metadata=metadata)
        manifest["outputs"][shard.name] = {**manifest["outputs"][shard.name], "size": shard.stat().st_size,
                                           "sha256": sha256_file(shard)}
    if not changed:
        raise RequantError(f"{src}: no tensor to damage with {kind!r} (not an MXFP4 checkpoint?)")
    (dst / MANIFEST_FILE).write_text(json.dumps(seal(manifest), indent=2) + "\n")
    return dst
