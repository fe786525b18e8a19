"""Mirror once, convert many: copy one revision of a Hub repository into object storage (or a directory) in the
layout the watcher and the conversions read, the Hugging Face cache's: ``snapshots/<commit>/<files>`` and
``refs/<branch>`` holding the commit.

Each file streams from the Hub into place without a local copy (S3 multipart parts, or a temporary file beside a
directory's target) and is checked against the Hub's sha256 (LFS) or git blob id before it becomes visible; the
mirrored object keeps the sha256 as its metadata, so conversions from the mirror verify their inputs against the
Hub's digests too. A file already mirrored with the same digest is skipped, so an interrupted mirror resumes and a
second mirror of a revision costs a listing. ``refs/<branch>`` is written last, only when every file is in place.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from requant.errors import CheckpointError
from requant.io.hf import NO_DIGEST, HfStorage, git_blob_hasher
from requant.io.storage import open_storage


@dataclass(frozen=True)
class MirrorPlan:
    source: str                  # hf://ORG/REPO@<commit>
    commit: str
    branch: str | None           # the branch or tag the request named (refs/<it> is moved), None for a commit
    snapshot: str                # <mirror>/snapshots/<commit>
    files: tuple[tuple[str, int], ...]  # (path, size), largest first: the long ones start early


def plan_mirror(upstream: str, mirror: str) -> MirrorPlan:
    """What to copy; a file the Hub publishes no digest for is refused before anything is copied (a mirror is
    trusted as the Hub's bytes)."""
    hub = HfStorage(upstream)
    if unchecked := [f for f in hub.list_files() if hub.published_digest(f) is None]:
        raise CheckpointError(f"{hub.uri}/{unchecked[0]}", NO_DIGEST)
    branch = None if hub.revision == hub.commit else hub.revision  # as the Hugging Face cache: refs/<branch or tag>
    files = sorted(((f, hub.size(f)) for f in hub.list_files()), key=lambda item: -item[1])
    return MirrorPlan(hub.pinned_uri(), hub.commit, branch, f"{mirror.rstrip('/')}/snapshots/{hub.commit}",
                      tuple(files))


def _already_there(dest, path: str, size: int, hub: HfStorage) -> bool:
    head = dest.head(path)
    if head is None or head["ContentLength"] != size:
        return False
    published = hub.recorded_sha256(path)
    if published:
        return (dest.recorded_sha256(path) or dest.sha256(path)) == published
    blob = git_blob_hasher(size)
    blob.update(dest.read_bytes(path))
    return blob.hexdigest() == hub.blob_id(path)


def mirror_file(source: str, snapshot: str, path: str) -> dict:
    """Copy one file of a pinned Hub revision into ``snapshot``; ``{"path", "size", "copied"}``."""
    hub, dest = HfStorage(source), open_storage(snapshot, create=True)
    size = hub.size(path)
    if _already_there(dest, path, size, hub):
        return {"path": path, "size": size, "copied": False}
    published = hub.recorded_sha256(path)
    if published and hasattr(dest, "open_stream"):  # object storage: parts go up while the rest downloads
        stream = dest.open_stream(path, sha256=published)
        try:
            for chunk in hub.iter_file(path):  # raises on a wrong digest, before complete()
                stream.write(chunk)
            stream.complete()
        except BaseException:
            stream.abort()
            raise
    else:
        with tempfile.TemporaryDirectory(prefix="requant-mirror-", dir=_scratch(dest)) as tmp:
            local = Path(tmp) / "file"
            hub.copy_file_to(path, local)  # checked against the Hub's digest
            dest.put_file(path, local)
    return {"path": path, "size": size, "copied": True}


def _scratch(dest) -> str | None:
    """Beside a local destination (same file system: the final move is a rename), else the system's temp."""
    root = getattr(dest, "root", None)
    if root is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def finish_mirror(plan: MirrorPlan, mirror: str, done: list[dict]) -> dict:
    """After every file: check the set is complete, then move ``refs/<branch>`` to the commit."""
    missing = sorted({p for p, _ in plan.files} - {d["path"] for d in done})
    if missing:
        raise CheckpointError(f"{plan.snapshot}/{missing[0]}", f"not mirrored ({len(missing)} files missing)")
    root = open_storage(mirror, create=True)
    if plan.branch:
        root.put_bytes(f"refs/{plan.branch}", (plan.commit + "\n").encode())
    return {"source": plan.source, "commit": plan.commit, "snapshot": plan.snapshot, "files": len(done),
            "copied": sum(d["copied"] for d in done), "bytes_copied": sum(d["size"] for d in done if d["copied"]),
            "bytes": sum(d["size"] for d in done)}


def mirror_local(upstream: str, mirror: str, workers: int = 4,
                 on_file: Callable[[dict], None] | None = None) -> dict:
    """The whole mirror from this process, ``workers`` files at a time (the flow runs them as Ray tasks)."""
    plan = plan_mirror(upstream, mirror)
    open_storage(mirror, create=True).ensure_bucket()
    done = []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="requant-mirror") as pool:
        for result in pool.map(lambda item: mirror_file(plan.source, plan.snapshot, item[0]), plan.files):
            done.append(result)
            if on_file:
                on_file(result)
    return finish_mirror(plan, mirror, done)


