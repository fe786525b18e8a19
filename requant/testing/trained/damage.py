"""Deliberately damaged conversions: what a converter bug would publish, to prove the downstream checks catch it.

Each damage rewrites some tensors of a finished checkpoint (a local folder) into a copy and, where the copy has a
manifest, reseals it as a buggy converter would have sealed its own output: ``requant verify`` cannot tell, so only
the smoke test and the GSM8K gate stand between it and a release. Shards are read with the project's validated
reader and written with its writer (same layout as the safetensors library's).

Whole-model damages (MXFP4 checkpoints):

- ``scales-x2``: every routed expert's MXFP4 scale one exponent too high (E8M0 byte + 1: weights doubled);
- ``nibbles-swapped``: every routed expert's two E2M1 codes per byte in the wrong order;
- ``router-zeroed``: the first MoE layer's router weight all zero.

Damages of a few experts (what a bad shard or a converter bug in one code path does), ``experts`` chosen by
``(layer, expert)`` pairs (default: :data:`DEFAULT_EXPERTS`):

- ``experts-sign-flipped``: the sign bit of every FP4 code of the experts' gate/up/down weights flipped;
- ``experts-scales-x2``: the experts' E8M0 scales one exponent too high.

A damage no smoke test on a few prompts can see (any checkpoint with a BF16 embedding, the INT4 upstream too):

- ``embed-rows-zeroed``: rows ``rows = (start, stop)`` of the token embedding zeroed, as a torn write leaves a
  span of bytes. Tokens the smoke prompts never use are untouched by the smoke test; the GSM8K gate must fail it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from requant.errors import RequantError
from requant.io.safetensors import TORCH_TO_NAME, SafetensorsWriter, TensorSpec, read_header, read_tensor
from requant.io.storage import open_storage
from requant.manifest import MANIFEST_FILE, seal

ROUTED = re.compile(r"\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.")
FP4_SIGN_BITS = 0x88            # bit 3 of each E2M1 nibble is its sign; two nibbles per byte
DEFAULT_EXPERTS = {"experts-sign-flipped": 2, "experts-scales-x2": 3}  # how many experts, spread over the MoE layers

DAMAGES: dict[str, str] = {
    "scales-x2": "routed experts' MXFP4 scales one exponent too high",
    "nibbles-swapped": "routed experts' FP4 nibbles swapped in every byte",
    "router-zeroed": "the first MoE layer's router zeroed",
    "experts-sign-flipped": "a few routed experts' FP4 signs flipped",
    "experts-scales-x2": "a few routed experts' MXFP4 scales one exponent too high",
    "embed-rows-zeroed": "a span of token-embedding rows zeroed",
}

Edit = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def _is_mxfp4_weight(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dtype == torch.uint8


def _is_e8m0_scale(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight_scale") and t.dtype == torch.uint8


def _scale_up(t: torch.Tensor) -> torch.Tensor:
    return (t.to(torch.int16) + 1).clamp(max=254).to(torch.uint8)


def _routed(name: str, experts: set[tuple[int, int]] | None) -> bool:
    m = ROUTED.search(name)
    return m is not None and (experts is None or (int(m[1]), int(m[2])) in experts)


def _text_config(root: Path) -> dict:
    config = json.loads((root / "config.json").read_text())
    return config.get("text_config", config)


def default_experts(root: str | Path, count: int) -> list[tuple[int, int]]:
    """``count`` distinct (layer, expert) pairs spread over the MoE layers: layer by layer in turn, experts
    3, 5, 6, ... (neither the first nor the last, so a bug at a boundary is not what is being shown)."""
    text = _text_config(Path(root))
    layers = list(range(int(text.get("first_k_dense_replace", 0)), int(text["num_hidden_layers"])))
    n = int(text["n_routed_experts"])
    picks = [3, 5, 6, 2, 4, 1]
    out = [(layers[i % len(layers)], picks[i % len(picks)] % n) for i in range(count)]
    if len(set(out)) != count:
        raise RequantError(f"{root}: cannot pick {count} distinct experts from {len(layers)} layers x {n}")
    return out


def _edit_for(src: Path, kind: str, experts, rows) -> Edit:
    if kind == "scales-x2":
        return lambda name, t: _scale_up(t) if _routed(name, None) and _is_e8m0_scale(name, t) else None
    if kind == "nibbles-swapped":
        return lambda name, t: (((t & 0x0F) << 4) | (t >> 4)) if _routed(name, None) and _is_mxfp4_weight(name, t) else None
    if kind == "router-zeroed":
        layer = int(_text_config(src).get("first_k_dense_replace", 0))
        pattern = re.compile(rf"\.layers\.{layer}\.mlp\.gate\.weight$")
        return lambda name, t: torch.zeros_like(t) if pattern.search(name) else None   # E2M1 0 and BF16 0 are +0
    if kind in ("experts-sign-flipped", "experts-scales-x2"):
        chosen = set(experts or default_experts(src, DEFAULT_EXPERTS[kind]))
        if kind == "experts-sign-flipped":
            return lambda name, t: (t ^ FP4_SIGN_BITS) if _routed(name, chosen) and _is_mxfp4_weight(name, t) else None
        return lambda name, t: _scale_up(t) if _routed(name, chosen) and _is_e8m0_scale(name, t) else None
    if rows is None:
        raise RequantError("embed-rows-zeroed needs rows=(start, stop)")
    start, stop = rows

    def zero_rows(name: str, t: torch.Tensor) -> torch.Tensor | None:
        if not name.endswith("embed_tokens.weight") or "vision" in name:
            return None
        out = t.clone()
        out[start:stop] = 0
        return out
    return zero_rows


def damage(src: str | Path, dst: str | Path, kind: str, experts: list[tuple[int, int]] | None = None,
           rows: tuple[int, int] | None = None) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with damage ``kind`` (a key of DAMAGES) and, if it has a manifest, a
    resealed one. ``experts``: the (layer, expert) pairs of the experts-* damages; ``rows``: embed-rows-zeroed's
    [start, stop) token rows."""
    src, dst = Path(src), Path(dst)
    if kind not in DAMAGES:
        raise RequantError(f"unknown damage {kind!r}; one of {', '.join(DAMAGES)}")
    edit = _edit_for(src, kind, experts, rows)
    shutil.copytree(src, dst)
    manifest_path = dst / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    storage = open_storage(str(dst))
    changed = 0
    for shard in sorted(dst.glob("*.safetensors")):
        entries, metadata = read_header(storage, shard.name)
        tensors = {name: read_tensor(storage, entry) for name, entry in entries.items()}
        edits = {name: new for name, t in tensors.items() if (new := edit(name, t)) is not None}
        if not edits:
            continue
        changed += len(edits)
        tensors.update(edits)
        metadata = {k: v for k, v in metadata.items() if k != "format"}
        shard.unlink()                                     # the copy may be a hard link of the source's bytes
        writer = SafetensorsWriter(shard, [TensorSpec(n, TORCH_TO_NAME[t.dtype], tuple(t.shape))
                                           for n, t in tensors.items()], metadata)
        for name in writer.order():
            writer.write(name, tensors[name])
        digest = writer.close()
        if manifest is not None:
            manifest["outputs"][shard.name] = {**manifest["outputs"][shard.name], "size": shard.stat().st_size,
                                               "sha256": digest}
    if not changed:
        shutil.rmtree(dst)
        raise RequantError(f"{src}: no tensor to damage with {kind!r} (not an MXFP4 checkpoint?)")
    if manifest is not None:
        manifest_path.write_text(json.dumps(seal(manifest), indent=2) + "\n")
    return dst


@dataclass(frozen=True)
class Damaged:
    """One damaged variant of the trained model: ``kind`` applied to the honest conversion ``base``."""

    name: str
    base: str                                   # a recipe's variant, or "int4-upstream"
    kind: str
    experts: tuple[tuple[int, int], ...] | None = None


# What the measurements and tests build. The few-expert damages start from amd-kimi-k25-mxfp4, a recipe that
# passes the gate undamaged; embed-rows-zeroed from the INT4 upstream, whose rows are chosen at run time
# (unseen_rows) so that no smoke-test text uses them and as many gold answers as possible do.
CATALOG = (
    Damaged("experts-sign-flipped-2", "amd-kimi-k25-mxfp4", "experts-sign-flipped"),
    Damaged("experts-sign-flipped-3", "amd-kimi-k25-mxfp4", "experts-sign-flipped", ((1, 3), (2, 5), (1, 6))),
    Damaged("experts-scales-x2-3", "amd-kimi-k25-mxfp4", "experts-scales-x2"),
    Damaged("scales-x2", "kimi-k2.6-mxfp4", "scales-x2"),
    Damaged("nibbles-swapped", "kimi-k2.6-mxfp4", "nibbles-swapped"),
    Damaged("router-zeroed", "kimi-k2.6-mxfp4", "router-zeroed"),
    Damaged("embed-rows-zeroed", "int4-upstream", "embed-rows-zeroed"),
)


def unseen_rows(checkpoint: str | Path, seen: list[str], wanted: list[str], width: int = 8) -> tuple[int, int]:
    """The span of ``width`` token rows that none of the ``seen`` texts uses and the most ``wanted`` texts do
    (ties: the lowest start), tokenized with the checkpoint's tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))
    used = set().union(*(tok.encode(t, add_special_tokens=False).ids for t in seen))
    want = [set(tok.encode(t, add_special_tokens=False).ids) for t in wanted]
    best = (0, 0)
    for start in range(tok.get_vocab_size() - width + 1):
        span = set(range(start, start + width))
        if not span & used:
            best = max(best, (sum(bool(span & w) for w in want), -start))
    if best[0] == 0:
        raise RequantError(f"{checkpoint}: no span of {width} token rows is unused by the seen texts and used by "
                           "the wanted ones")
    return -best[1], -best[1] + width
