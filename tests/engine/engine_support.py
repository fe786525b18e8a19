"""Constants and helpers shared by the engine lane's fixtures and tests."""

from __future__ import annotations

import json
from pathlib import Path

from requant.engines.decisions import Targets
from requant.io.safetensors import sha256_file
from requant.manifest import CONFIG_FILE, MANIFEST_FILE
from requant.recipe import builtins_in

HERE = Path(__file__).resolve().parent
RECIPES = tuple(builtins_in("engine"))  # the built-in recipes whose files name this lane (`lanes:`, default all)
ROUTER_ONLY = HERE / "router-only-mxfp4.yaml"
MAX_MODEL_LEN = 4096  # 3-shot GSM8K prompts of the synthetic tokenizer plus 256 generated tokens


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def checkpoint_targets(checkpoint: str | Path, draft: bool = False) -> Targets:
    """What the recipe recorded in a converted checkpoint's manifest intends per engine layer, its MTP layers
    included (``draft``: the layers of SGLang's MTP draft model), as ``requant engine-probe`` reads it."""
    root = Path(checkpoint)
    return Targets.of(json.loads((root / MANIFEST_FILE).read_text())["recipe"],
                      json.loads((root / CONFIG_FILE).read_text()), draft=draft)
