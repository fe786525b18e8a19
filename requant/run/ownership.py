"""Who may write an output and when it counts as published.

A run holds a lease on its output while it writes there (:mod:`requant.lease`); workers confirm it before each
write, so a run presumed dead and taken over cannot overwrite the new holder's shards. A checkpoint is published by
writing ``requant-manifest.json`` last; a run first removes any old manifest (:func:`begin_run`), so a prefix is
complete exactly when its manifest exists.
"""

from __future__ import annotations

from collections.abc import Collection

from requant.io.storage import WritableStorage, open_storage
from requant.lease import Lease, LeaseLost, current_generation
from requant.manifest import MANIFEST_FILE, RUN_STATE_DIR, is_evaluation, read_manifest
from requant.planning import is_shard_name

LEASE_DIR = f"{RUN_STATE_DIR}/lease"


def output_lease(dest_uri: str, key: str) -> Lease:
    """The lease run ``key`` takes on ``dest_uri`` before writing anything there (see requant.lease)."""
    dest = open_storage(dest_uri, create=True)
    dest.ensure_bucket()
    return Lease(dest, LEASE_DIR, key, dest.uri)


def check_lease(dest: WritableStorage, generation: int | None) -> None:
    """Workers confirm their run still holds the output before each write (None: the caller holds it and checks
    it itself, as the local runner does)."""
    if generation is None:
        return
    current = current_generation(dest, LEASE_DIR)
    if current != generation:
        raise LeaseLost(f"{dest.uri}: the output's lease is generation {current}, this run holds {generation}: "
                        f"another run took over; not writing")


def published_key(dest_uri: str) -> str | None:
    """The run key of the checkpoint published at ``dest_uri`` (None when nothing complete is there)."""
    try:
        dest = open_storage(dest_uri)
        if not dest.exists(MANIFEST_FILE):
            return None
        return read_manifest(dest).get("upstream", {}).get("run_key")
    except Exception:  # unreadable or absent: treat as not published; the conversion will surface real faults
        return None


def begin_run(dest_uri: str, shards: Collection[str] | None = None) -> None:
    """Unpublish: whatever sits at the destination is incomplete until this run writes its manifest. ``shards``:
    the output shards this run writes; any other shard there (an earlier run's, cut otherwise) is removed, so that
    the published prefix holds exactly what its manifest lists."""
    dest = open_storage(dest_uri, create=True)
    dest.ensure_bucket()
    if dest.exists(MANIFEST_FILE):
        dest.delete(MANIFEST_FILE)
    for name in dest.list_files():
        stale_shard = shards is not None and is_shard_name(name) and name not in shards
        if is_evaluation(name) or stale_shard:      # evaluations of the previous contents are stale now
            dest.delete(name)
