"""Prefect task of the mirror-upstream flow: one file of a Hub revision into the mirror (requant.io.mirror)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from requant.io import mirror as mirroring


@task(name="mirror-file", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def mirror_file(source: str, snapshot: str, path: str) -> dict:
    """Stream one file of a pinned Hub revision into ``snapshot``, checked; skipped when already there."""
    return mirroring.mirror_file(source, snapshot, path)
