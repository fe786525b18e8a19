"""The files of a checkpoint by name, and the two JSON tables every reader needs: the safetensors index and
requant's provenance manifest (read, sealed, written).

Producers (assemble, pipeline) and checkers (verify, evaluation, serving) both use this module, so a checker
never imports the code whose output it checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from requant.errors import CheckpointError

CONFIG_FILE = "config.json"
HF_QUANT_CONFIG = "hf_quant_config.json"  # NVIDIA Model Optimizer's description of a checkpoint's quantization
INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"  # a checkpoint without an index holds exactly this shard
MANIFEST_FILE = "requant-manifest.json"  # written last: a checkpoint is complete exactly when it exists
MANIFEST_VERSION = 1
MODEL_CARD = "README.md"
UPSTREAM_CARD = "UPSTREAM_README.md"  # the upstream's own model card, kept verbatim
RUN_STATE_DIR = ".requant"  # per-run job records and the output's lease; not part of the checkpoint
EVAL_DIR = "eval"  # evaluation reports, listed in the manifest like the weights


def is_run_state(name: str) -> bool:
    return name.startswith(f"{RUN_STATE_DIR}/")


HUB_HOUSEKEEPING = (".gitattributes",)  # what a Hub repository holds beside a release (the Hub writes it)
HUB_DOWNLOAD_STATE = ".cache/huggingface/"  # what huggingface_hub keeps in a download's local_dir


def is_hub_housekeeping(name: str) -> bool:
    """A file a Hub repository or a download of it holds that is no part of the checkpoint."""
    return name in HUB_HOUSEKEEPING or name.startswith(HUB_DOWNLOAD_STATE)


def is_evaluation(name: str) -> bool:
    return name.startswith(f"{EVAL_DIR}/")


def eval_path(*parts: str) -> str:
    """A name under ``eval/``, e.g. ``eval_path("gsm8k.png")`` -> ``eval/gsm8k.png``."""
    return "/".join((EVAL_DIR, *parts))


# --- the index --------------------------------------------------------------------------------------------
def read_weight_map(storage) -> dict[str, str] | None:
    """Tensor name -> shard file from the checkpoint's index; None when there is no index."""
    if not storage.exists(INDEX_FILE):
        return None
    try:
        weight_map = json.loads(storage.read_bytes(INDEX_FILE))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError) as exc:  # ValueError: invalid JSON or UTF-8
        raise CheckpointError(f"{storage.uri}/{INDEX_FILE}", f"not a valid index ({exc})") from exc
    return weight_map


# --- the manifest -----------------------------------------------------------------------------------------
def read_manifest(storage) -> Any:
    """The manifest's JSON as stored (invalid JSON raises ValueError; callers say what that means to them)."""
    return json.loads(storage.read_bytes(MANIFEST_FILE))


def _canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes a manifest's digest is taken over: its canonical JSON without the digest field."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """Record the manifest's own sha256 (of its canonical JSON without this field) so that `verify` catches
    an edit or a flipped byte in the manifest itself, not only in the files it lists."""
    manifest["digest"] = manifest_digest(manifest)
    return manifest


def is_sealed(manifest: Any) -> bool:
    """A JSON object whose digest matches its content."""
    return isinstance(manifest, dict) and manifest.get("digest") == manifest_digest(manifest)


# The stored form: the canonical JSON the digest is taken over, the digest appended as its last member.
_STORED_SEAL = re.compile(rb',"digest":"([0-9a-f]{64})"}\n?\Z')


def sealed_bytes(manifest: dict[str, Any]) -> bytes:
    """Seal ``manifest`` and return the bytes to store: its canonical JSON with the digest appended, so the JSON is
    encoded once (a K2.6 manifest describes ~10^5 tensors) and a reader checks the seal by hashing the bytes
    (``sealed_as_stored``) instead of encoding the manifest again."""
    body = _canonical(manifest)
    manifest["digest"] = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"digest":"' + manifest["digest"].encode() + b'"}\n'


def sealed_as_stored(raw: bytes, manifest: Any) -> bool:
    """``is_sealed`` of ``manifest``, parsed from ``raw``: from the bytes when they are in ``sealed_bytes``' form,
    else (manifests written otherwise, or edited) by encoding the parsed manifest again."""
    stored = _STORED_SEAL.search(raw, max(0, len(raw) - 100))
    if stored and isinstance(manifest, dict) and manifest.get("digest") == stored.group(1).decode():
        if hashlib.sha256(raw[:stored.start()] + b"}").hexdigest() == manifest["digest"]:
            return True
    return is_sealed(manifest)


def store_manifest(storage, manifest: dict[str, Any]) -> None:
    """Seal ``manifest`` and write it over the checkpoint's manifest (after the files it lists)."""
    storage.put_bytes(MANIFEST_FILE, sealed_bytes(manifest))
