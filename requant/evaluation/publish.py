"""Attach an evaluation to a published checkpoint: report files under ``eval/``, the model card rendered again from
the checkpoint's facts (:mod:`requant.card`, now with the evaluation), and the manifest, which lists every eval file
with its size and sha256 so ``requant verify`` covers them like the weights. The manifest is rewritten last, as at
publish time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from requant.card import CardFacts, render_card
from requant.errors import RequantError
from requant.io.safetensors import sha256_file
from requant.io.storage import open_storage
from requant.manifest import EVAL_DIR, MANIFEST_FILE, MODEL_CARD, read_manifest, store_manifest


def publish_evaluation(uri: str, local_dir: Path, quality: str | None = None,
                       summary: dict[str, Any] | None = None, prefix: str = EVAL_DIR) -> list[str]:
    """Upload ``local_dir`` to ``<uri>/<prefix>/``, replacing an earlier evaluation there, and render the model card
    again; returns object names. ``quality`` is not used any more (the card renders the Quality section from
    ``eval/report.json`` itself); it stays so that callers passing the old section body keep working."""
    storage = open_storage(uri)
    if not storage.exists(MANIFEST_FILE):
        raise RequantError(f"{storage.uri}: no {MANIFEST_FILE}; evaluate only published checkpoints")
    manifest = read_manifest(storage)
    outputs: dict[str, dict] = manifest["outputs"]
    stale = [name for name in outputs if name.startswith(prefix + "/")]
    uploaded = []
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        name = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
        digest = sha256_file(path)
        storage.put_file(name, path, sha256=digest)
        outputs[name] = {"size": path.stat().st_size, "sha256": digest}
        uploaded.append(name)
    for name in stale:
        if name not in uploaded:
            storage.delete(name)
            del outputs[name]
    if summary is not None:
        manifest.setdefault("evaluations", {})[prefix] = summary
    card = render_card(CardFacts.from_checkpoint(storage, manifest)).encode("utf-8")
    storage.put_bytes(MODEL_CARD, card)
    outputs[MODEL_CARD] = {"size": len(card), "sha256": hashlib.sha256(card).hexdigest()}
    manifest["outputs"] = dict(sorted(outputs.items()))
    store_manifest(storage, manifest)
    return uploaded
