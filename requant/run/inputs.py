"""What a run read: every upstream file, each checked against the digest its publisher gives, for the manifest."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from requant.errors import CheckpointError
from requant.io.hf import NO_DIGEST
from requant.io.storage import Storage, open_storage
from requant.manifest import CONFIG_FILE
from requant.planning import Plan


def input_files(plan: Plan) -> list[str]:
    """Every upstream file a conversion reads: the shards, the config and the files copied verbatim."""
    return [*(f for f, _ in plan.input_shards), CONFIG_FILE, *plan.extra_files]


def unverifiable_inputs(source: Storage, files: list[str], unverified: bool = False) -> list[str]:
    """The ``files`` that ``source`` (a Hub) publishes no digest for; refused, naming the first, unless
    ``unverified``. Other sources list none: a directory publishes no digests, S3 objects are checked when read."""
    published = getattr(source, "published_digest", None)
    missing = [f for f in files if published(f) is None] if published else []
    if missing and not unverified:
        more = f" (and {len(missing) - 1} more inputs)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source.uri}/{missing[0]}", f"{NO_DIGEST}{more}; pass --unverified to convert "
                                                            "without that check")
    return missing


def input_digest(source: Storage | str, file: str, unverified: bool = False) -> dict[str, Any]:
    """Size and sha256 of the bytes of one upstream file as read now; ``source`` is a Storage or its URI.

    Where the source publishes a digest (the Hub's LFS sha256 or git blob id; the sha256 metadata of objects
    requant uploaded), the bytes read must match it: a bit flip in storage or in transit fails the run here, before
    anything is published. Elsewhere the manifest pins what was read. A Hub file with no published digest is
    refused unless ``unverified``; its record then says ``"unverified": true``.
    """
    source = open_storage(source) if isinstance(source, str) else source
    if hasattr(source, "checked_sha256"):  # the Hub: checked against its digest while downloading
        unverifiable = bool(unverifiable_inputs(source, [file], unverified))
        computed, verified = source.checked_sha256(file)
        return {"size": source.size(file), "sha256": computed, "verified_against_published": verified,
                **({"unverified": True} if unverifiable else {})}
    computed = source.sha256(file)
    published = source.recorded_sha256(file)
    if published and published != computed:
        raise CheckpointError(f"{source.uri}/{file}", f"sha256 of the bytes read ({computed[:16]}...) differs from "
                              f"the published {published[:16]}...: corrupted in storage or in transit")
    return {"size": source.size(file), "sha256": computed, "verified_against_published": bool(published)}


def input_record(source: Storage | str, plan: Plan, shards: dict[str, dict] | None = None, progress: bool = False,
                 unverified: bool = False) -> dict[str, Any]:
    """The manifest's provenance of the inputs: every shard read and every file copied. ``shards`` may
    come precomputed (the flow hashes them in parallel tasks)."""
    if shards is None:
        files = tqdm(plan.input_shards, desc="hash inputs", unit=" shards", disable=not progress)
        shards = {f: input_digest(source, f, unverified) for f, _ in files}
    return {"shards": shards,
            "files": {f: input_digest(source, f, unverified) for f in (CONFIG_FILE, *plan.extra_files)}}
