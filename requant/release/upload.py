"""``requant release SRC hf://ORG/REPO[@BRANCH]``: a published, evaluated checkpoint as one commit on the Hub.

The steps, each through huggingface_hub's own commit API:

1. **Check** the checkpoint: its manifest's seal, and the release gate (its evaluation PASSed, or ``force`` says
   why not). The card is rendered for this release (:mod:`requant.card`) and a release manifest written for it:
   the checkpoint's manifest listing that card, so ``requant verify`` passes on a download of the commit.
2. **Compare** with what the branch holds: files the branch already has with the manifest's size and sha256 are not
   read or sent; files of an earlier release of the same model that this one no longer has are deleted; a branch
   holding another model's files is refused unless ``overwrite``. Nothing to change: no commit.
3. **Read and hash** every file to send, streamed from storage (a directory or S3; memory: one 1 MiB buffer per
   file, no local disk), and compare with the manifest: a file that is not what its manifest says stops the release
   before anything is committed.
4. **Upload** the large files (LFS; the client's multipart transfer on the Hub), one file at a time with progress.
   The Hub keeps uploaded objects, so a release interrupted here and run again sends only what it lacks.
5. **Commit** in one commit on top of the head read in step 2 (``parent_commit``): if the branch moved meanwhile the
   Hub refuses it and so does the release (run again to release on top of the new head). ``create_pr``: a pull
   request instead.
6. **Verify** the new commit's listing (sizes, LFS sha256, git blob ids) against the release manifest, and record
   the commit beside the checkpoint (:mod:`requant.release.record`).

The large files go as file objects, which the client sends by the LFS protocol (its Xet path takes only local paths
or bytes in memory, and a release from S3 has neither).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from requant.errors import CheckpointError, RequantError
from requant.io.hf import git_blob_hasher, hub_endpoint
from requant.io.storage import open_storage
from requant.io.stream import open_stream
from requant.manifest import (
    MANIFEST_FILE,
    MODEL_CARD,
    is_hub_housekeeping,
    sealed_as_stored,
    sealed_bytes,
)
from requant.progress import phase
from requant.release.gate import GateDecision, evaluation_verdict, release_gate
from requant.release.hub_errors import release_failure
from requant.release.record import ReleaseRecord, add_record
from requant.release.target import ReleaseTarget, parse_target

IN_MEMORY = 10 * 1024 * 1024  # files up to this size are read once into memory (cards, configs, reports)
HASH_THREADS = 4


@dataclass(frozen=True)
class ReleaseOptions:
    """``private``: create the repository private; ``create_pr``: open a pull request instead of committing to the
    branch; ``force``: release a checkpoint whose evaluation did not PASS, giving the reason the card will show;
    ``overwrite``: replace a branch that holds another model's files; ``message``: the commit's title."""

    private: bool = False
    create_pr: bool = False
    force: str | None = None
    overwrite: bool = False
    message: str | None = None


@dataclass(frozen=True)
class ReleaseResult:
    """What a release did: the commit the branch (or the pull request) now names, its page, and what was sent."""

    target: ReleaseTarget
    commit: str
    url: str
    verdict: str
    changed: bool
    pull_request: str | None = None
    forced: str | None = None
    sent: tuple[str, ...] = ()      # the files this release read and handed to the Hub (the rest it already held)
    bytes_sent: int = 0
    deleted: tuple[str, ...] = field(default_factory=tuple)

    @property
    def record(self) -> ReleaseRecord:
        return ReleaseRecord(self.target.repo_id, self.target.branch, self.verdict, self.commit, self.url,
                             self.pull_request, self.forced, self.changed)


@dataclass(frozen=True)
class _Release:
    """The files of one release: name -> (size, sha256), and the bytes of those made for it (card, manifest)."""

    files: dict[str, tuple[int, str]]
    made: dict[str, bytes]
    upstream_id: str
    recipe: str


def release(source: str, target: str | ReleaseTarget, options: ReleaseOptions | None = None) -> ReleaseResult:
    """Release the published checkpoint at ``source`` (a directory or s3://) to ``target`` (``hf://ORG/REPO[@BRANCH]``)
    and record it beside the checkpoint; a refusal (the gate, another model's files) is recorded too."""
    options = options or ReleaseOptions()
    target = parse_target(target) if isinstance(target, str) else target
    storage = open_storage(source)
    manifest = _read_checked_manifest(storage)
    try:
        gate = release_gate(manifest, storage.uri, options.force)
        result = _release(storage, manifest, gate, target, options)
    except RequantError as exc:
        _record(storage, ReleaseRecord(target.repo_id, target.branch, evaluation_verdict(manifest), refused=str(exc)))
        raise
    _record(storage, result.record)
    return result


def _record(storage, record: ReleaseRecord) -> None:
    """Note the release beside the checkpoint; a checkpoint this process may only read keeps no record (the release
    itself stands: its commit is on the Hub and in the output)."""
    try:
        add_record(storage, record)
    except (RequantError, OSError) as exc:
        logging.getLogger(__name__).warning("%s: could not record the release beside the checkpoint: %s",
                                            storage.uri, exc)


def _read_checked_manifest(storage) -> dict[str, Any]:
    if not storage.exists(MANIFEST_FILE):
        raise RequantError(f"{storage.uri}: no {MANIFEST_FILE}: only a published checkpoint can be released")
    raw = storage.read_bytes(MANIFEST_FILE)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{storage.uri}/{MANIFEST_FILE}", "not valid JSON; corrupted or truncated") from exc
    if not sealed_as_stored(raw, manifest):
        raise CheckpointError(f"{storage.uri}/{MANIFEST_FILE}", "its digest does not match its content (modified or "
                                                                "corrupted); run `requant verify`")
    return manifest


def release_files(storage, manifest: dict[str, Any], gate: GateDecision, target: ReleaseTarget) -> _Release:
    """The files of a release: the checkpoint's, with the card rendered for this release, and a release manifest
    that lists that card (so the commit verifies on its own)."""
    from requant.card import CardFacts, ReleaseFacts, render_card

    facts = CardFacts.from_checkpoint(storage, manifest, ReleaseFacts(repo_id=target.repo_id, forced=gate.forced))
    card = render_card(facts).encode("utf-8")
    # the checkpoint's own manifest stays as it is: a copy with its own outputs table (the rest is shared, unchanged)
    released = {k: v for k, v in manifest.items() if k != "digest"} | {"outputs": dict(manifest["outputs"])}
    released["outputs"][MODEL_CARD] = {"size": len(card), "sha256": hashlib.sha256(card).hexdigest()}
    released["release"] = {"repo": target.repo_id, "verdict": gate.verdict, "forced": gate.forced}
    body = sealed_bytes(released)
    files = {name: (info["size"], info["sha256"]) for name, info in released["outputs"].items()}
    files[MANIFEST_FILE] = (len(body), hashlib.sha256(body).hexdigest())
    upstream = manifest.get("upstream") or {}
    return _Release(files, {MODEL_CARD: card, MANIFEST_FILE: body}, str(upstream.get("id")),
                    str((manifest.get("recipe") or {}).get("name")))


def _release(storage, manifest: dict, gate: GateDecision, target: ReleaseTarget,
             options: ReleaseOptions) -> ReleaseResult:
    from huggingface_hub import CommitOperationDelete, HfApi

    endpoint = hub_endpoint()
    where = target.uri
    api = HfApi(endpoint=endpoint)
    files = release_files(storage, manifest, gate, target)
    with _errors(where, endpoint):
        api.create_repo(target.repo_id, private=options.private, exist_ok=True)
        head = _branch_head(api, target)
        remote = _listing(api, target.repo_id, head)
    sends, deletes = _changes(storage, files, remote, _previous_release(target, head, remote), where, options.overwrite)
    url = f"{endpoint}/{target.repo_id}/commit/{head}"
    if not sends and not deletes:
        return ReleaseResult(target, head, url, gate.verdict, changed=False, forced=gate.forced)
    operations = _read_and_hash(storage, files, sends, where)
    sent = _upload(api, target, operations, options, where, endpoint)
    message = options.message or (f"requant: {files.recipe} of {files.upstream_id} "
                                  f"@ {(manifest.get('upstream') or {}).get('revision', '?')}")
    with _errors(where, endpoint):
        info = api.create_commit(target.repo_id, [*operations, *(CommitOperationDelete(p) for p in deletes)],
                                 commit_message=message, commit_description=_description(gate),
                                 revision=target.branch, parent_commit=head, create_pr=options.create_pr)
    commit = info.oid
    if commit == head and not options.create_pr:  # the client found nothing to change after all and made no commit
        return ReleaseResult(target, head, url, gate.verdict, changed=False, forced=gate.forced)
    _verify_commit(api, target, commit, files, storage)
    return ReleaseResult(target, commit, info.commit_url, gate.verdict, changed=True,
                         pull_request=info.pr_url if options.create_pr else None, forced=gate.forced,
                         sent=tuple(op.path_in_repo for op in operations), bytes_sent=sent, deleted=tuple(deletes))


def _description(gate: GateDecision) -> str:
    if gate.forced:
        return f"Forced past the release gate (evaluation: {gate.verdict}): {gate.forced}"
    return f"Evaluation: {gate.verdict}."


class _errors:
    """Turn what the Hub client raises into one line (context manager; ``file`` names the file being sent)."""

    def __init__(self, where: str, endpoint: str, file: str | None = None) -> None:
        self.where, self.endpoint, self.file = where, endpoint, file

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, RequantError) and isinstance(exc, Exception):
            raise release_failure(exc, self.where, self.endpoint, self.file) from exc
        return False


def _branch_head(api, target: ReleaseTarget) -> str:
    """The commit the branch names now, creating the branch from the default one when it does not exist yet."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.model_info(target.repo_id, revision=target.branch).sha
    except RevisionNotFoundError:
        api.create_branch(target.repo_id, branch=target.branch, exist_ok=True)
        return api.model_info(target.repo_id, revision=target.branch).sha


def _listing(api, repo_id: str, commit: str) -> dict[str, dict]:
    """Every file at ``commit``: size, git blob id and, for LFS files, sha256."""
    from huggingface_hub.hf_api import RepoFile

    return {e.path: {"size": e.size, "blob_id": e.blob_id, "sha256": e.lfs.sha256 if e.lfs else None}
            for e in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(e, RepoFile)}


def _previous_release(target: ReleaseTarget, head: str, remote: dict[str, dict]) -> dict | None:
    """The requant manifest the branch holds (an earlier release), if any."""
    if MANIFEST_FILE not in remote:
        return None
    from requant.io.hf import HfStorage

    try:
        return json.loads(HfStorage(f"hf://{target.repo_id}@{head}").read_bytes(MANIFEST_FILE))
    except ValueError:
        return None


def _same(entry: dict, size: int, sha256: str) -> bool:
    return entry.get("size") == size and entry.get("sha256") == sha256


def _changes(storage, files: _Release, remote: dict[str, dict], previous: dict | None, where: str,
             overwrite: bool) -> tuple[list[str], list[str]]:
    """The files to send (missing or different on the branch) and to delete (on the branch, not in this release)."""
    sends = [name for name, (size, sha) in sorted(files.files.items())
             if name not in remote or not _same_file(remote[name], size, sha,
                                                     lambda name=name: _stored_blob_id(storage, name, files))]
    extra = sorted(p for p in remote if p not in files.files and not is_hub_housekeeping(p))
    same_model = previous is not None and (
        (previous.get("upstream") or {}).get("id") == files.upstream_id
        and (previous.get("recipe") or {}).get("name") == files.recipe)
    if same_model:   # an earlier release of this model: its files this release lacks are deleted
        foreign = [p for p in extra if p not in previous.get("outputs", {})]
    else:            # anything else on the branch is someone else's (a fresh repo holds only housekeeping files)
        foreign = sorted(p for p in remote if not is_hub_housekeeping(p) and (previous is not None or p != MODEL_CARD))
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        what = ("a release of another model "
                f"({(previous.get('upstream') or {}).get('id')}, recipe {(previous.get('recipe') or {}).get('name')})"
                if previous is not None and not same_model else "files that no requant release wrote")
        raise RequantError(f"{where}: the branch holds {what}: {shown}; refused (--overwrite replaces them)")
    return sends, extra


def _same_file(entry: dict, size: int, sha256: str, blob_id: Callable[[], str]) -> bool:
    """Whether the branch's file is the release's: by the LFS sha256 the Hub publishes, else (a file kept in git,
    which the Hub does only for small ones) by its git blob id."""
    if entry.get("size") != size:
        return False
    if entry.get("sha256"):
        return entry["sha256"] == sha256
    return size <= IN_MEMORY and entry.get("blob_id") == blob_id()


def _blob_id(data: bytes) -> str:
    h = git_blob_hasher(len(data))
    h.update(data)
    return h.hexdigest()


class _ByLfsOnPurpose(logging.Filter):
    """Drops the client's per-file warning that file objects go by HTTP (LFS) rather than Xet: a release streams
    from storage on purpose (see the module docstring), and the warning would repeat once per file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not supported by Xet Storage" not in record.getMessage()


def _quiet_xet_fallback() -> None:
    commit_log = logging.getLogger("huggingface_hub._commit_api")
    if not any(isinstance(f, _ByLfsOnPurpose) for f in commit_log.filters):
        commit_log.addFilter(_ByLfsOnPurpose())


def _read_and_hash(storage, files: _Release, names: list[str], where: str) -> list:
    """A commit operation per file, each hashed as it is read (the client needs the sha256 before it uploads) and
    compared with the manifest: a byte that is not what the checkpoint's manifest says stops the release here."""
    from huggingface_hub import CommitOperationAdd

    def operation(name: str):
        size, sha = files.files[name]
        if name in files.made:
            data = io.BytesIO(files.made[name])
        elif size <= IN_MEMORY:
            data = io.BytesIO(storage.read_bytes(name))
        else:
            data = open_stream(storage, name, size)
        op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
        got = op.upload_info.sha256.hex()
        if op.upload_info.size != size or got != sha:
            raise CheckpointError(f"{storage.uri}/{name}", f"{op.upload_info.size} bytes with sha256 {got[:16]}..., "
                                                           f"the manifest says {size} bytes, {sha[:16]}...; "
                                                           "not released")
        return op

    total = sum(files.files[n][0] for n in names)
    with phase(f"release: read and check {len(names)} files ({total / 1e9:.2f} GB)", total=len(names),
               unit="files") as shown, ThreadPoolExecutor(HASH_THREADS) as pool:
        operations = []
        for op in pool.map(operation, names):
            operations.append(op)
            shown.advance(note=op.path_in_repo)
    return operations


def _upload(api, target: ReleaseTarget, operations: list, options: ReleaseOptions, where: str,
            endpoint: str, on_file: Callable[[str], None] | None = None) -> int:
    """Send the large files one by one (the Hub skips objects it already holds); returns the bytes handed over."""
    _quiet_xet_fallback()
    sent = 0
    with phase(f"release: upload to {where}", total=len(operations), unit="files") as shown:
        for op in operations:
            with _errors(where, endpoint, op.path_in_repo):
                api.preupload_lfs_files(target.repo_id, [op], revision=target.branch, create_pr=options.create_pr,
                                        free_memory=False)
            sent += op.upload_info.size if op._upload_mode == "lfs" else 0
            shown.advance(note=op.path_in_repo)
            if on_file is not None:
                on_file(op.path_in_repo)
    return sent


def _verify_commit(api, target: ReleaseTarget, commit: str, files: _Release, storage) -> None:
    """The new commit's listing against the release manifest: every file with its size and digest, nothing else."""
    listed = _listing(api, target.repo_id, commit)
    problems = []
    for name, (size, sha) in sorted(files.files.items()):
        entry = listed.get(name)
        if entry is None:
            problems.append(f"{name}: missing")
        elif entry["size"] != size:
            problems.append(f"{name}: {entry['size']} bytes, manifest says {size}")
        elif entry["sha256"] is not None and entry["sha256"] != sha:
            problems.append(f"{name}: LFS sha256 differs from the manifest")
        elif entry["sha256"] is None and entry["blob_id"] != _stored_blob_id(storage, name, files):
            problems.append(f"{name}: git blob id differs from the manifest's file")
    problems += [f"{p}: not in the release" for p in sorted(set(listed) - set(files.files)) if not is_hub_housekeeping(p)]
    if problems:
        raise RequantError(f"hf://{target.repo_id}@{commit}: the released commit does not match the manifest: "
                           + "; ".join(problems[:5]))


def _stored_blob_id(storage, name: str, files: _Release) -> str:
    if name in files.made:
        return _blob_id(files.made[name])
    h = git_blob_hasher(files.files[name][0])
    with open_stream(storage, name, files.files[name][0]) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
