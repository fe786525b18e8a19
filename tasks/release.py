"""Prefect task of the release step: a checkpoint to the Hub (requant.release), its record beside the checkpoint."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from requant.release import ReleaseOptions, ReleaseResult, release
from requant.release.record import ReleaseRecord, add_record


@task(name="release", cache_policy=NO_CACHE)
def release_checkpoint(source: str, target: str, options: ReleaseOptions) -> ReleaseResult:
    """Gate, upload, commit and verify; a failure is one line and leaves nothing committed (a rerun resumes)."""
    return release(source, target, options)


@task(name="release-refused", cache_policy=NO_CACHE)
def record_refusal(source: str, target: str, verdict: str, reason: str) -> None:
    """Say beside the checkpoint why it was not released (the watcher's ledger shows it)."""
    from requant.io.storage import open_storage
    from requant.release import parse_target

    where = parse_target(target)
    add_record(open_storage(source), ReleaseRecord(where.repo_id, where.branch, verdict, refused=reason))
