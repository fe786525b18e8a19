"""A local stand-in for the Hugging Face Hub: enough of its HTTP protocol that the real ``huggingface_hub`` client
(``HfApi``, ``hf_hub_download``, ``snapshot_download``, ``HfFileSystem``, and on the write side ``create_repo``,
``create_commit``, ``preupload_lfs_files``, ``create_branch``, ``upload_file``/``upload_folder`` over HTTP) works
against it through ``HF_ENDPOINT`` (or ``endpoint=``). A test and demo component, like the embedded S3 server of
:mod:`requant.testing.seaweed`.

Data model, no git: ``ROOT/ORG/REPO/refs/NAME`` holds a commit id (``refs/pr/N`` a pull request's); ``commits/COMMIT/``
holds that revision's files and ``commits/COMMIT.json`` its metadata (parent, message, date and, per file, size, git
blob id and for LFS files the sha256, all computed once when the commit is made, never per request);
``lfs-objects/SHA256`` the LFS objects uploaded (committed or not); an optional ``repo.json`` holds settings:
``{"gated": true, "private": false, "tokens": ["hf_..."]}`` (tokens that may read).

As on the Hub, LFS files (``*.safetensors``, ``*.bin``, or over 10 MiB) answer ``resolve`` with a 302 to a signed
storage URL, carrying ``X-Linked-Size`` and ``X-Linked-Etag``. :func:`serve_hub` serves that storage on a second
port, like the Hub's CDN: the client follows same-origin redirects on HEAD (it would then miss those headers) and
drops the token off the Hub origin. Errors carry the ``X-Error-Code`` the client maps to its exception classes.
Gated repos list their files openly; downloads need a listed token (401 without a token, 403 with another).
Private repos need a listed token or a write token. Model repos only; branch names without '/'; tree listings and
commit histories are not paginated. A revision the client quotes whole (``refs%2Fpr%2F1``) stays one path segment.

Write side, as the client speaks it: ``POST /api/repos/create`` (an initial commit holding a ``.gitattributes``;
409 with the repo's URL when it exists), ``DELETE /api/repos/delete``; ``preupload`` (upload mode per file: LFS by
name, size or a binary sample; the ``oid`` of the file now at that path, with which the client drops unchanged files
and skips empty commits); the LFS batch API (objects the repo holds, committed or only uploaded, get no actions:
an interrupted upload resumes per object), basic uploads and, above ``multipart_threshold``, multipart ones (parts of
``multipart_chunk_size``, then a completion call) on the storage port, each body streamed to a temp file while hashed
and stored only once its sha256 and size match; ``verify``; ``commit`` (NDJSON: ``file``, ``lfsFile``,
``deletedFile``, ``deletedFolder``; ``parentCommit`` not the head: 412; ``create_pr=1``: a new ``refs/pr/N``, the
branch untouched); branches, refs and the commit history. Every write needs a token: 401 without one; with
``write_tokens`` given, 403 for any other (a read-only token). Tokens are never logged or stored.

Faults, for tests (:meth:`HubState.set_fault`, :meth:`HubState.hide_digests`): a file whose bytes, size or ETag
changed under a pinned commit, a body corrupted in transit, a listing that publishes no digest. ``publish(...,
lfs=False)`` keeps every file in git, as a mirror serving a git repository does (the listing names git blob ids).
:meth:`HubState.fail_next` answers any request, reads and writes and upload PUTs alike, with an error status;
:meth:`HubState.cut_uploads` drops an upload's connection mid-body; ``HubState.delay_uploads`` holds each upload's
answer back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs, unquote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from requant.errors import RequantError, printable
from requant.io.paths import check_relative

LFS_SUFFIXES = (".safetensors", ".bin")
LFS_MIN_SIZE = 10 * 1024 * 1024
MULTIPART_THRESHOLD = 64 << 20  # LFS objects above this go up in parts
MULTIPART_CHUNK = 16 << 20
CHUNK = 1 << 20  # read buffer for hashing and for streaming responses
# what a new repo's initial commit holds; the Hub's own lists many more patterns, these are the ones it treats as LFS
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
COMMIT_RACE = "A commit has happened since. Please refresh and try again."  # the Hub's 412 message: clients match it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # org, repo and branch names: no '/', no '..'
_COMMIT = re.compile(r"[0-9a-f]{40}")
_PR_REF = re.compile(r"refs/pr/([1-9][0-9]*)")
_OID = re.compile(r"[0-9a-f]{64}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
FAULTS = ("bytes", "size", "etag", "transit")
SHRINK = 64  # bytes the "size" fault cuts off a file


def _git_blob_id(size: int, chunks: Iterable[bytes]) -> str:
    h = hashlib.sha1(b"blob %d\0" % size)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _read_chunks(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = (os.fstat(f.fileno()).st_size if end is None else end) - start
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk


def _describe(path: Path, rel: str, lfs: bool | None = None, sha256: str | None = None) -> dict:
    """Size and git blob id; for LFS files the sha256 (``sha256`` if already known), and the blob id and size of the
    pointer git stores. ``lfs`` None: LFS by name or size, as the Hub decides."""
    size = path.stat().st_size
    if lfs is None:
        lfs = rel.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE
    if not lfs:
        return {"size": size, "oid": _git_blob_id(size, _read_chunks(path))}
    if sha256 is None:
        h = hashlib.sha256()
        for chunk in _read_chunks(path):
            h.update(chunk)
        sha256 = h.hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return {"size": size, "oid": _git_blob_id(len(pointer), [pointer]),
            "lfs": {"sha256": sha256, "pointerSize": len(pointer)}}


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy of multi-GB files; a published file must then not be rewritten in place
    except OSError:
        shutil.copyfile(src, dst)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _repo_dir(root: Path, repo: str) -> Path:
    org, _, name = repo.partition("/")
    if not (_NAME.fullmatch(org) and _NAME.fullmatch(name)):
        raise RequantError(f"repo {repo!r}: expected ORG/REPO (letters, digits, '.', '_', '-')")
    return Path(root) / org / name


def _ref_name(name: str) -> str:
    if not _NAME.fullmatch(name) or _COMMIT.fullmatch(name):
        raise RequantError(f"ref {name!r}: letters, digits, '.', '_', '-', and not a commit id")
    return name


def _ref_path(repo_dir: Path, rev: str) -> Path | None:
    """The file of ref ``rev`` (a branch or tag name, or ``refs/pr/N``); None if ``rev`` cannot name a ref."""
    if m := _PR_REF.fullmatch(rev):
        return repo_dir / "refs" / "pr" / m[1]
    return repo_dir / "refs" / rev if _NAME.fullmatch(rev) and not _COMMIT.fullmatch(rev) else None


@dataclass(frozen=True)
class _Add:
    """A file of a new commit: bytes, or a local file (hard-linked); ``lfs`` None decides by name and size;
    ``sha256``: already known (a verified upload), not computed again."""

    content: bytes | os.PathLike
    lfs: bool | None = None
    sha256: str | None = None


def _write_commit(repo_dir: Path, parent: str | None, adds: Mapping[str, _Add], delete: Iterable[str] = (),
                  message: str = "", description: str = "", stamp: str | None = None) -> str:
    """Store the commit holding ``parent``'s files less ``delete`` plus ``adds`` (paths already checked) and return
    its id; moves no ref. The id derives from the parent, message and content, and from ``stamp`` (its date) when
    given: two commits of the same change then differ, as in git."""
    commits = repo_dir / "commits"
    entries = dict(_meta(commits / f"{parent}.json")["files"]) if parent else {}
    for rel in delete:
        entries.pop(rel, None)
    dirs = {rel.rsplit("/", i)[0] for rel in (*entries, *adds) for i in range(1, rel.count("/") + 1)}
    if clash := dirs & {*entries, *adds}:
        raise RequantError(f"{repo_dir.parent.name}/{repo_dir.name}: {sorted(clash)[0]!r} would be both a file and a "
                           "folder")
    commits.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=commits))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would become the commit folder's mode
        for rel in entries.keys() | adds.keys():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            add = adds.get(rel)
            if add is None:
                _place(commits / parent / rel, staging / rel)
            elif isinstance(add.content, os.PathLike):
                _place(Path(add.content), staging / rel)
            else:
                (staging / rel).write_bytes(add.content)
            if add is not None:
                entries[rel] = _describe(staging / rel, rel, add.lfs, add.sha256)
        digest = hashlib.sha1(f"parent {parent or ''}\n{message}\n".encode())
        if stamp is not None:
            digest.update(f"{description}\n{stamp}\n".encode())
        for rel in sorted(entries):
            digest.update(f"{rel}\0{entries[rel].get('lfs', {}).get('sha256') or entries[rel]['oid']}\n".encode())
        commit = digest.hexdigest()
        if not (commits / commit).is_dir():
            meta = {"parent": parent, "message": message, "date": stamp or _now(),
                    **({"description": description} if description else {}), "files": dict(sorted(entries.items()))}
            _write_atomic(commits / f"{commit}.json", json.dumps(meta))
            os.replace(staging, commits / commit)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return commit


def publish(root: str | Path, repo: str, files: Mapping[str, bytes | os.PathLike], branch: str = "main",
            message: str = "Upload files", delete: Iterable[str] = (), lfs: bool = True) -> str:
    """Commit ``files`` (path in repo -> bytes, or a local file, hard-linked where possible) on top of ``branch``'s
    head, removing ``delete``; move the branch to the new commit and return its id. ``lfs`` False: the new files are
    kept in git (listed by git blob id, no sha256), whatever their name or size."""
    repo_dir = _repo_dir(Path(root), repo)
    head = repo_dir / "refs" / _ref_name(branch)
    parent = head.read_text().strip() if head.is_file() else None
    entries = dict(_meta(repo_dir / "commits" / f"{parent}.json")["files"]) if parent else {}
    gone = []
    for rel in delete:
        gone.append(check_relative(rel, repo))
        if entries.pop(gone[-1], None) is None:
            raise RequantError(f"{repo}: cannot delete {rel!r}, not in {branch}")
    changed = {check_relative(rel, repo): content for rel, content in files.items()}
    if wrong := [rel for rel, c in changed.items() if not isinstance(c, (bytes, bytearray, memoryview))
                 and not (isinstance(c, os.PathLike) and Path(c).is_file())]:
        raise RequantError(f"{repo}/{wrong[0]}: content must be bytes or the Path of an existing file")
    commit = _write_commit(repo_dir, parent, {rel: _Add(c, None if lfs else False) for rel, c in changed.items()},
                           gone, message)
    head.parent.mkdir(exist_ok=True)
    _write_atomic(head, commit + "\n")  # last: readers resolve the branch only to a complete commit
    return commit


def publish_dir(root: str | Path, repo: str, directory: str | os.PathLike, branch: str = "main",
                message: str = "Upload checkpoint", lfs: bool = True, if_changed: bool = False) -> str:
    """Commit every file under ``directory`` (hard-linked where possible) as the new head of ``branch``; files of
    the branch's previous head that the directory lacks are removed (``lfs``: see :func:`publish`). Returns the
    commit id; with ``if_changed``, the head's when it already holds exactly these files (no new commit)."""
    src = Path(directory)
    if not src.is_dir():
        raise RequantError(f"{src}: not a directory")
    files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file() and not p.is_symlink()}
    head = _repo_dir(Path(root), repo) / "refs" / _ref_name(branch)
    old = _meta(head.parent.parent / "commits" / f"{head.read_text().strip()}.json")["files"] if head.is_file() else {}
    if if_changed and old and set(old) == set(files) and all(
            _describe(path, rel, lfs) == old[rel] for rel, path in files.items()):
        return head.read_text().strip()
    return publish(root, repo, files, branch=branch, message=message, delete=[rel for rel in old if rel not in files],
                   lfs=lfs)


def set_ref(root: str | Path, repo: str, name: str, commit: str) -> None:
    """Point a branch or tag ``name`` at an existing ``commit``."""
    repo_dir = _repo_dir(Path(root), repo)
    if not (repo_dir / "commits" / f"{commit}.json").is_file():
        raise RequantError(f"{repo}: no commit {commit!r}")
    _write_atomic(repo_dir / "refs" / _ref_name(name), commit + "\n")


@lru_cache(maxsize=512)
def _meta(path: Path) -> dict:
    return json.loads(path.read_text())  # commits are immutable: safe to cache, never mutated by readers


class HubError(Exception):
    """An error answered the Hub's way: JSON ``{"error": ...}`` plus ``X-Error-Code``/``X-Error-Message``."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None,
                 body: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit
        self.body = dict(body or {})  # more fields of the JSON answer (a 409 on create names the repo's URL)

    def response(self, extra: Mapping[str, str] | None = None) -> JSONResponse:
        # header values must be latin-1 and single-line; names in messages come from URLs
        headers = {"X-Error-Message": printable(self.message, 300).encode("ascii", "backslashreplace").decode(),
                   **(extra or {})}
        headers.update({k: v for k, v in (("X-Error-Code", self.code), ("X-Repo-Commit", self.commit)) if v})
        return JSONResponse({"error": self.message, **self.body}, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it, for tests to assert on."""

    method: str
    path: str
    status: int
    range: str | None
    authorization: bool


class HubState:
    """Per-app state: the data root, who may write, injected failures and the request log."""

    def __init__(self, root: Path, storage_url: str | None, write_tokens: Iterable[str] | None = None,
                 multipart_threshold: int = MULTIPART_THRESHOLD, multipart_chunk_size: int = MULTIPART_CHUNK):
        if multipart_threshold < 0 or multipart_chunk_size < 1:
            raise RequantError(f"multipart_threshold must be >= 0 and multipart_chunk_size >= 1, got "
                               f"{multipart_threshold}, {multipart_chunk_size}")
        self.root, self.storage_url = root, storage_url
        self.write_tokens = None if write_tokens is None else frozenset(write_tokens)  # None: any token may write
        self.multipart_threshold, self.multipart_chunk_size = multipart_threshold, multipart_chunk_size
        self.secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._failures: list[tuple[int, int | None, str | None]] = []  # status, Retry-After, path part
        self._cuts: list[tuple[int, str | None]] = []  # bytes to let through, path part
        self._seen: list[Seen] = []
        self._lfs: dict[Path, dict[str, Path]] = {}
        self._repo_locks: dict[Path, threading.Lock] = {}
        self._faults: dict[tuple[str, str], list] = {}  # (ORG/REPO, path) -> [fault, bodies left or None]
        self._hidden: set[str] = set()  # repos whose listings publish no digest
        self.ignore_ranges = False  # answer every GET with the whole file, as some mirrors do
        self.delay_uploads = 0.0  # seconds each upload PUT waits, its body stored, before answering

    def may_write(self, token: str | None) -> bool:
        return bool(token) and (self.write_tokens is None or token in self.write_tokens)

    def repo_lock(self, repo_dir: Path) -> threading.Lock:
        """The lock a repo's ref updates (commits, branches, creation) hold."""
        with self._lock:
            return self._repo_locks.setdefault(repo_dir, threading.Lock())

    def set_fault(self, repo: str, path: str, fault: str | None, times: int | None = None) -> None:
        """Serve ``path`` of ``repo`` (at every commit) wrongly, the listing unchanged: ``bytes``: one byte changed
        (5 from the end), the headers as published; ``size``: the last 64 bytes gone, the headers naming the new
        size; ``etag``: the same bytes under another ETag (``X-Linked-Etag`` for LFS files); ``transit``: the
        headers right, one byte of the body (the middle of the span sent) flipped on its way. ``times``: only the
        next so many bodies (None: until cleared); ``fault`` None clears."""
        if fault is not None and fault not in FAULTS or times is not None and times < 1:
            raise RequantError(f"set_fault: fault must be one of {FAULTS} or None and times >= 1, got {fault!r}, "
                               f"{times!r}")
        with self._lock:
            if fault is None:
                self._faults.pop((repo, path), None)
            else:
                self._faults[(repo, path)] = [fault, times]

    def fault(self, repo: str, path: str, body: bool) -> str | None:
        """The fault to serve ``path`` of ``repo`` with now; a ``body`` sent uses up one of a counted fault's."""
        with self._lock:
            found = self._faults.get((repo, path))
            if found is None:
                return None
            if body and found[1] is not None:
                found[1] -= 1
                if found[1] == 0:
                    del self._faults[(repo, path)]
            return found[0]

    def hide_digests(self, repo: str, hidden: bool = True) -> None:
        """List ``repo``'s files without any digest (``oid`` null, no LFS sha256), as some mirrors do."""
        with self._lock:
            (self._hidden.add if hidden else self._hidden.discard)(repo)

    def digests_hidden(self, repo: str) -> bool:
        with self._lock:
            return repo in self._hidden

    def fail_next(self, n: int, status: int = 429, retry_after: int | None = 1, path_contains: str | None = None):
        """Answer the next ``n`` requests (whose path contains ``path_contains``, if given) with ``status``: reads,
        writes and the LFS upload PUTs (``/lfs-upload/``) alike; a request body is read and dropped first."""
        if n < 0 or not 400 <= status <= 599:
            raise RequantError(f"fail_next: need n >= 0 and an error status, got n={n}, status={status}")
        with self._lock:
            self._failures += [(status, retry_after, path_contains)] * n

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()
            self._cuts.clear()

    def take_failure(self, path: str) -> tuple[int, int | None, str | None] | None:
        with self._lock:
            i = next((i for i, f in enumerate(self._failures) if f[2] is None or f[2] in path), None)
            return None if i is None else self._failures.pop(i)

    def cut_uploads(self, n: int = 1, after_bytes: int = 0, path_contains: str | None = None) -> None:
        """Drop the connection of the next ``n`` upload PUTs (basic or part; whose path contains ``path_contains``,
        if given) once more than ``after_bytes`` of the body arrived, as a dying network or server would: nothing is
        stored and the client sees a broken connection."""
        if n < 0 or after_bytes < 0:
            raise RequantError(f"cut_uploads: need n >= 0 and after_bytes >= 0, got {n}, {after_bytes}")
        with self._lock:
            self._cuts += [(after_bytes, path_contains)] * n

    def take_cut(self, path: str) -> int | None:
        with self._lock:
            i = next((i for i, c in enumerate(self._cuts) if c[1] is None or c[1] in path), None)
            return None if i is None else self._cuts.pop(i)[0]

    def record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def sign(self, org: str, name: str, sha256: str) -> str:
        return hmac.new(self.secret, f"{org}/{name}/{sha256}".encode(), "sha256").hexdigest()

    def sign_upload(self, org: str, name: str, oid: str, size: int, chunk: int) -> str:
        return hmac.new(self.secret, f"upload:{org}/{name}/{oid}/{size}/{chunk}".encode(), "sha256").hexdigest()

    def lfs_file(self, repo_dir: Path, sha256: str) -> Path | None:
        found = self._lfs.get(repo_dir, {}).get(sha256)
        if found is None:  # a new commit may have added it: rescan this repo's (small) commit indexes
            table = {e["lfs"]["sha256"]: repo_dir / "commits" / meta.stem / rel
                     for meta in (repo_dir / "commits").glob("*.json")
                     for rel, e in _meta(meta)["files"].items() if "lfs" in e}
            self._lfs[repo_dir] = table
            found = table.get(sha256)
        return found

    def forget(self, repo_dir: Path) -> None:
        """Drop what is cached of a deleted repo."""
        self._lfs.pop(repo_dir, None)


def _route_path(scope) -> str:
    """The path to route on: each segment decoded, but a '/' the client encoded (it quotes ``refs/pr/1`` whole) kept
    as ``%2F``, and '%' as ``%25``, so a revision stays one segment; handlers unquote revisions and paths once."""
    raw = scope.get("raw_path")
    if raw is None:
        return scope["path"]
    segments = raw.decode("latin-1").partition("?")[0].split("/")
    return "/".join(unquote(s).replace("%", "%25").replace("/", "%2F") for s in segments)


async def _drain(receive) -> None:
    """Read and drop a request's body, so that an early answer reaches a client still sending one."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class _Recorder:
    """ASGI middleware: routes on :func:`_route_path`, answers injected failures and logs every request with its
    status (never its headers: no token is kept)."""

    def __init__(self, app, state: HubState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = {**scope, "path": _route_path(scope)}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                self.state.record(Seen(scope["method"], scope["path"], status, headers.get("range"),
                                       "authorization" in headers))

        async def sending(message):
            if message["type"] == "http.response.start":
                record(message["status"])  # now, not at the end: the client may act on the body before that
            await send(message)

        try:
            if failure := self.state.take_failure(scope["path"]):
                status, retry_after, _ = failure
                await _drain(receive)
                extra = {} if retry_after is None else {"Retry-After": str(retry_after)}
                await HubError(status, None, f"injected failure (HTTP {status})").response(extra)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            record(500)  # no response started: the app raised, and the server answers 500


def _byte_range(spec: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) of a single ``bytes=`` range; None to serve the whole file (no or unusable header, as RFC 9110
    allows); HubError 416 when it cannot be satisfied."""
    m = _RANGE.fullmatch((spec or "").replace(" ", ""))
    if not m or m.groups() == ("", ""):
        return None
    first, last = m.groups()
    if first == "":
        start, end = (max(size - int(last), 0), size) if int(last) else (size, size)  # bytes=-0: nothing
    else:
        start, end = int(first), size if last == "" else min(int(last) + 1, size)
        if last != "" and int(last) < start:
            return None
    if start >= size:
        raise HubError(416, None, f"range {spec} not satisfiable for {size} bytes")
    return start, end


def _changed(digest: str) -> str:
    """Another digest of the same length: what a file changed under its commit would be served with."""
    return hashlib.sha256(f"changed {digest}".encode()).hexdigest()[:len(digest)]


def _advertised(size: int, etag: str, fault: str | None) -> tuple[int, str]:
    """The size and ETag a file is served with under ``fault``."""
    return size - SHRINK if fault == "size" else size, _changed(etag) if fault == "etag" else etag


def _flipped(chunks: Iterable[bytes], offset: int, flip: int | None) -> Iterator[bytes]:
    """``chunks`` (starting at file position ``offset``) with the byte at position ``flip`` changed."""
    for chunk in chunks:
        if flip is not None and offset <= flip < offset + len(chunk):
            chunk = bytearray(chunk)
            chunk[flip - offset] ^= 0x40
            chunk = bytes(chunk)
        offset += len(chunk)
        yield chunk


def _file_response(request: Request, path: Path, size: int, etag: str, headers: dict[str, str],
                   ignore_ranges: bool = False, fault: str | None = None) -> Response:
    size, etag = _advertised(size, etag, fault)
    headers = {**headers, "ETag": f'"{etag}"', "Accept-Ranges": "none" if ignore_ranges else "bytes",
               "Content-Type": "application/octet-stream"}
    try:
        span = None if ignore_ranges else _byte_range(request.headers.get("range"), size)
    except HubError as err:
        return err.response({"Content-Range": f"bytes */{size}"})
    start, end = span or (0, size)
    headers["Content-Length"] = str(end - start)  # never compressed: Accept-Encoding identity always holds
    if span:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    status = 206 if span else 200
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    flip = {"bytes": max(size - 5, 0), "transit": start + (end - start) // 2}.get(fault)
    return StreamingResponse(_flipped(_read_chunks(path, start, end), start, flip), status_code=status,
                             headers=headers)


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return (auth[7:].strip() or None) if auth[:7].lower() == "bearer " else None


def _file_entry(rel: str, e: dict, hidden: bool = False) -> dict:
    out = {"type": "file", "oid": None if hidden else e["oid"], "size": e["size"], "path": rel}
    if "lfs" in e and not hidden:
        out["lfs"] = {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
    return out


def _folders(files: Mapping[str, dict]) -> dict[str, str]:
    """Every folder of a snapshot with a tree id derived from what it holds (git's own tree ids need git)."""
    members: dict[str, list[str]] = {}
    for rel, e in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            members.setdefault("/".join(parts[:i]), []).append(f"{rel}\0{e['oid']}")
    return {d: hashlib.sha1("\n".join(sorted(m)).encode()).hexdigest() for d, m in members.items()}


def _open_repo(state: HubState, org: str, name: str, request: Request, download: bool = False) -> tuple[Path, dict]:
    """The repo's folder and settings, if this request may read it (HubError 401/403/404 the Hub's way if not)."""
    repo_dir = state.root / org / name
    if not (_NAME.fullmatch(org) and _NAME.fullmatch(name) and (repo_dir / "refs").is_dir()):
        raise HubError(404, "RepoNotFound", "Repository not found")
    settings = json.loads(p.read_text()) if (p := repo_dir / "repo.json").is_file() else {}
    token = _token(request)
    if token is not None and not token.startswith("hf_"):
        raise HubError(401, None, "Invalid credentials in Authorization header")
    listed = token is not None and token in settings.get("tokens", ())
    if settings.get("private") and not (listed or state.may_write(token)):
        raise HubError(401 if token is None else 404, "RepoNotFound", "Repository not found")
    if download and settings.get("gated") and not listed:
        if token is None:
            raise HubError(401, "GatedRepo", f"Access to model {org}/{name} is restricted. You must have access "
                                             "to it and be authenticated to access it. Please log in.")
        raise HubError(403, "GatedRepo", f"Access to model {org}/{name} is restricted and you are not in the "
                                         "authorized list.")
    return repo_dir, settings


def _resolve(repo_dir: Path, rev: str) -> tuple[str, dict]:
    """The commit id and metadata ``rev`` (a commit id, branch, tag or ``refs/pr/N``, maybe quoted) names."""
    rev = unquote(rev)
    commit = rev if _COMMIT.fullmatch(rev) else None
    if commit is None and (ref := _ref_path(repo_dir, rev)) is not None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is None or not (meta := repo_dir / "commits" / f"{commit}.json").is_file():
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
    return commit, _meta(meta)


def _require_writer(state: HubState, request: Request) -> None:
    """HubError unless the request carries a token that may write: 401 without one, 403 for a read-only one."""
    token = _token(request)
    if token is None:
        raise HubError(401, None, "Authentication required: writing needs a token with write access "
                                  "(Authorization: Bearer hf_...)")
    if not token.startswith("hf_"):
        raise HubError(401, None, "Invalid credentials in Authorization header")
    if not state.may_write(token):
        raise HubError(403, None, "This token is read-only: writing needs a token with write access")


def _hub_base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise HubError(400, None, "expected a JSON object")
    return body


def create_app(root: str | Path, storage_url: str | None = None, write_tokens: Iterable[str] | None = None,
               multipart_threshold: int = MULTIPART_THRESHOLD, multipart_chunk_size: int = MULTIPART_CHUNK) -> FastAPI:
    """The Hub app over ``root``. ``storage_url``: the origin LFS redirects and upload URLs point to; give it an
    origin other than the app's (see the module docstring); by default the app's own. ``write_tokens``: the tokens
    that may write (None: any ``hf_`` token). LFS objects over ``multipart_threshold`` bytes go up in parts of
    ``multipart_chunk_size``."""
    state = HubState(Path(root), storage_url.rstrip("/") if storage_url else None, write_tokens, multipart_threshold,
                     multipart_chunk_size)
    app = FastAPI(title="requant hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = state
    app.add_middleware(_Recorder, state=state)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError):
        return exc.response()

    @app.exception_handler(RequantError)
    async def bad_input(request: Request, exc: RequantError):
        return HubError(400, None, str(exc)).response()

    _add_read_routes(app, state)
    _add_repo_routes(app, state)
    _add_commit_routes(app, state)
    _add_lfs_routes(app, state)
    return app


def _add_read_routes(app: FastAPI, state: HubState) -> None:
    """model_info, tree, paths-info, resolve and the storage origin's downloads."""

    @app.get("/api/models/{org}/{name}")
    @app.get("/api/models/{org}/{name}/revision/{rev:path}")
    def model_info(org: str, name: str, request: Request):
        repo_dir, settings = _open_repo(state, org, name, request)
        commit, meta = _resolve(repo_dir, request.path_params.get("rev", "main"))
        blobs = request.query_params.get("blobs", "").lower() in ("1", "true")
        hidden = state.digests_hidden(f"{org}/{name}")
        siblings = []
        for rel, e in meta["files"].items():
            siblings.append({"rfilename": rel, **({"size": e["size"], "blobId": None if hidden else e["oid"]}
                                                  if blobs else {})})
            if blobs and "lfs" in e and not hidden:
                siblings[-1]["lfs"] = {"sha256": e["lfs"]["sha256"], "size": e["size"],
                                       "pointerSize": e["lfs"]["pointerSize"]}
        gated = settings.get("gated") or False
        body = {"_id": hashlib.sha1(f"{org}/{name}".encode()).hexdigest()[:24], "id": f"{org}/{name}",
                "author": org, "sha": commit, "lastModified": meta["date"], "private": bool(settings.get("private")),
                "gated": "auto" if gated is True else gated, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "siblings": siblings, "usedStorage": sum(e["size"] for e in meta["files"].values())}
        if expand := request.query_params.getlist("expand"):
            body = {k: v for k, v in body.items() if k in ("_id", "id") or k in expand}
        return body

    @app.get("/api/models/{org}/{name}/tree/{rev}")
    @app.get("/api/models/{org}/{name}/tree/{rev}/{path:path}")
    def tree(org: str, name: str, rev: str, request: Request):
        commit, meta = _resolve(_open_repo(state, org, name, request)[0], rev)
        files, folders = meta["files"], _folders(meta["files"])
        path = unquote(request.path_params.get("path", "")).strip("/")
        if path and path not in folders:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", commit)
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""

        def listed(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

        return ([{"type": "directory", "oid": oid, "size": 0, "path": d} for d, oid in sorted(folders.items())
                 if listed(d)] + [_file_entry(rel, e, state.digests_hidden(f"{org}/{name}"))
                                  for rel, e in files.items() if listed(rel)])

    @app.post("/api/models/{org}/{name}/paths-info/{rev}")
    async def paths_info(org: str, name: str, rev: str, request: Request):
        body = await request.body()
        if request.headers.get("content-type", "").startswith("application/json"):
            paths = json.loads(body or b"{}").get("paths", [])
        else:  # huggingface_hub posts a form: paths=a&paths=b&expand=false
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        commit, meta = await run_in_threadpool(lambda: _resolve(_open_repo(state, org, name, request)[0], rev))
        folders, out = _folders(meta["files"]), []
        for p in [paths] if isinstance(paths, str) else paths:
            p = p.strip("/")
            if p in meta["files"]:
                out.append(_file_entry(p, meta["files"][p], state.digests_hidden(f"{org}/{name}")))
            elif p in folders:
                out.append({"type": "directory", "oid": folders[p], "size": 0, "path": p})
        return out

    @app.api_route("/lfs-storage/{org}/{name}/{sha256}", methods=["GET", "HEAD"])
    def storage(org: str, name: str, sha256: str, request: Request):
        signature = request.query_params.get("sig", "")
        if not hmac.compare_digest(signature, state.sign(org, name, sha256)):
            raise HubError(403, None, "Access denied: bad or missing signature")
        valid = _NAME.fullmatch(org) and _NAME.fullmatch(name)
        found = state.lfs_file(state.root / org / name, sha256) if valid else None
        if found is None:
            raise HubError(404, None, "No such object")
        rel = found.relative_to(state.root / org / name / "commits").as_posix().partition("/")[2]
        fault = state.fault(f"{org}/{name}", rel, body=request.method == "GET")
        return _file_response(request, found, found.stat().st_size, sha256, {}, state.ignore_ranges, fault)

    @app.api_route("/{org}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
    def resolve_file(org: str, name: str, rev: str, path: str, request: Request):
        repo_dir, _ = _open_repo(state, org, name, request, download=True)
        commit, meta = _resolve(repo_dir, rev)
        path = unquote(path)
        e = meta["files"].get(path)
        if e is None:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", commit)
        headers = {"X-Repo-Commit": commit}
        if "lfs" not in e:
            fault = state.fault(f"{org}/{name}", path, body=request.method == "GET")
            return _file_response(request, repo_dir / "commits" / commit / path, e["size"], e["oid"], headers,
                                  state.ignore_ranges, fault)
        sha = e["lfs"]["sha256"]
        base = state.storage_url or _hub_base(request)
        location = f"{base}/lfs-storage/{org}/{name}/{sha}?sig={state.sign(org, name, sha)}"
        size, etag = _advertised(e["size"], sha, state.fault(f"{org}/{name}", path, body=False))
        return Response(status_code=302, headers={**headers, "ETag": f'"{e["oid"]}"', "Location": location,
                                                  "X-Linked-Size": str(size), "X-Linked-Etag": f'"{etag}"'})


# --- repos, branches, refs, history ---------------------------------------------------------------------------------


def _create_repo(state: HubState, org: str, name: str, private: bool) -> bool:
    """Create ``org/name`` with a ``main`` branch holding the initial commit; False if it exists. Built aside and
    renamed into place: a repo is there whole or not at all."""
    repo_dir = state.root / org / name
    repo_dir.parent.mkdir(parents=True, exist_ok=True)
    with state.repo_lock(repo_dir):
        if repo_dir.exists():
            return False
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.creating-", dir=repo_dir.parent))
        try:
            staging.chmod(0o755)
            commit = _write_commit(staging, None, {".gitattributes": _Add(GITATTRIBUTES, lfs=False)}, (),
                                   "initial commit", stamp=_now())
            (staging / "refs").mkdir()
            _write_atomic(staging / "refs" / "main", commit + "\n")
            if private:
                (staging / "repo.json").write_text(json.dumps({"private": True}))
            os.rename(staging, repo_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        state.forget(repo_dir)
        return True


def _delete_repo(state: HubState, repo_dir: Path) -> None:
    with state.repo_lock(repo_dir):
        trash = repo_dir.with_name(f".{repo_dir.name}.deleted-{secrets.token_hex(4)}")
        os.rename(repo_dir, trash)  # gone at once for readers; the files go after
        state.forget(repo_dir)
    shutil.rmtree(trash, ignore_errors=True)


def _repo_named(body: dict) -> tuple[str, str]:
    """ORG and NAME of a create/delete request (model repos only; this Hub has no users: an organization is needed)."""
    org, name, kind = body.get("organization"), body.get("name"), body.get("type") or "model"
    if kind != "model":
        raise HubError(400, None, f"only model repos are served here, not {printable(kind)!r}")
    if not (isinstance(org, str) and isinstance(name, str) and _NAME.fullmatch(org) and _NAME.fullmatch(name)):
        raise HubError(400, None, "expected a repo id ORG/NAME (letters, digits, '.', '_', '-'); this Hub has no "
                                  "users, so name the organization")
    return org, name


def _list_refs(repo_dir: Path, with_prs: bool) -> dict:
    refs = repo_dir / "refs"

    def info(name: str, ref: str, path: Path) -> dict:
        return {"name": name, "ref": ref, "targetCommit": path.read_text().strip()}

    out = {"branches": [info(p.name, f"refs/heads/{p.name}", p) for p in sorted(refs.iterdir())
                        if p.is_file() and _NAME.fullmatch(p.name)], "converts": [], "tags": []}
    if with_prs:
        prs = sorted((int(p.name), p) for p in (refs / "pr").glob("*") if p.name.isdigit())
        out["pullRequests"] = [info(f"refs/pr/{n}", f"refs/pr/{n}", p) for n, p in prs]
    return out


def _history(repo_dir: Path, commit: str | None, author: str) -> list[dict]:
    """``commit`` and its ancestors, newest first, as list_repo_commits reads them."""
    out = []
    while commit:
        meta = _meta(repo_dir / "commits" / f"{commit}.json")
        out.append({"id": commit, "title": meta["message"], "message": meta.get("description", ""),
                    "authors": [{"user": author}], "date": meta["date"]})
        commit = meta["parent"]
    return out


def _create_branch(state: HubState, repo_dir: Path, branch: str, starting_point: str) -> None:
    if not _NAME.fullmatch(branch) or _COMMIT.fullmatch(branch) or branch == "pr":
        raise HubError(400, None, f"invalid branch name {printable(branch)!r}: letters, digits, '.', '_', '-'; not a "
                                  "commit id, not 'pr'")
    commit, _ = _resolve(repo_dir, starting_point)
    with state.repo_lock(repo_dir):
        if (repo_dir / "refs" / branch).exists():
            raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
        _write_atomic(repo_dir / "refs" / branch, commit + "\n")


def _delete_branch(state: HubState, repo_dir: Path, branch: str) -> None:
    if branch == "main":
        raise HubError(403, None, "the default branch 'main' cannot be deleted")
    ref = _ref_path(repo_dir, branch)
    with state.repo_lock(repo_dir):
        if ref is None or ref.parent != repo_dir / "refs" or not ref.is_file():
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        ref.unlink()


def _add_repo_routes(app: FastAPI, state: HubState) -> None:
    """create/delete a repo; create/delete a branch; list refs and commits."""

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        _require_writer(state, request)
        body = _json_object(await request.body())
        org, name = _repo_named(body)
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        url = f"{_hub_base(request)}/{org}/{name}"
        if not await run_in_threadpool(_create_repo, state, org, name, private):
            raise HubError(409, None, "You already created this model repo", body={"url": url})
        return {"url": url, "name": f"{org}/{name}"}

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request):
        _require_writer(state, request)
        org, name = _repo_named(_json_object(await request.body()))
        repo_dir, _ = await run_in_threadpool(_open_repo, state, org, name, request)
        await run_in_threadpool(_delete_repo, state, repo_dir)
        return {}

    @app.post("/api/models/{org}/{name}/branch/{branch}")
    async def create_branch(org: str, name: str, branch: str, request: Request):
        _require_writer(state, request)
        starting_point = _json_object(await request.body()).get("startingPoint") or "main"
        repo_dir, _ = await run_in_threadpool(_open_repo, state, org, name, request)
        await run_in_threadpool(_create_branch, state, repo_dir, unquote(branch), str(starting_point))
        return {}

    @app.delete("/api/models/{org}/{name}/branch/{branch}")
    def delete_branch(org: str, name: str, branch: str, request: Request):
        _require_writer(state, request)
        _delete_branch(state, _open_repo(state, org, name, request)[0], unquote(branch))
        return {}

    @app.get("/api/models/{org}/{name}/refs")
    def list_refs(org: str, name: str, request: Request):
        repo_dir, _ = _open_repo(state, org, name, request)
        return _list_refs(repo_dir, request.query_params.get("include_prs", "").lower() in ("1", "true"))

    @app.get("/api/models/{org}/{name}/commits/{rev}")
    def list_commits(org: str, name: str, rev: str, request: Request):
        repo_dir, _ = _open_repo(state, org, name, request)
        return _history(repo_dir, _resolve(repo_dir, rev)[0], org)


# --- preupload and commit -------------------------------------------------------------------------------------------


def _is_binary(sample: bytes) -> bool:
    """What the Hub stores in LFS whatever its name: a NUL byte, or not UTF-8 (a character cut at the end is fine)."""
    if b"\0" in sample:
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _upload_mode(item: object, files: Mapping[str, dict]) -> dict:
    """The preupload answer for one file: its mode, and the oid of the file now at that path (sha256 for LFS, the git
    blob id otherwise: what the client compares its own with to drop an unchanged file)."""
    if not (isinstance(item, dict) and isinstance(item.get("path"), str) and isinstance(item.get("size"), int)):
        raise HubError(400, None, "preupload: each file needs a path and a size")
    try:
        sample = base64.b64decode(item.get("sample") or "", validate=True)
    except (binascii.Error, TypeError) as err:
        raise HubError(400, None, f"preupload: {printable(item['path'])}: sample is not base64") from err
    path = item["path"]
    lfs = path.endswith(LFS_SUFFIXES) or item["size"] > LFS_MIN_SIZE or _is_binary(sample)
    out = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
    if (e := files.get(path)) is not None:
        out["oid"] = e["lfs"]["sha256"] if "lfs" in e else e["oid"]
    return out


_COMMIT_KEYS = ("header", "file", "lfsFile", "deletedFile", "deletedFolder")


def _commit_lines(raw: bytes) -> tuple[dict, list[tuple[str, dict]]]:
    """The header and the operations of an NDJSON commit body."""
    header, ops = None, []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if not (isinstance(item, dict) and item.get("key") in _COMMIT_KEYS and isinstance(item.get("value"), dict)):
            raise HubError(400, None, f"commit line {n}: expected {{\"key\": one of {_COMMIT_KEYS}, \"value\": {{...}}}}")
        if item["key"] == "header":
            header = item["value"]
        else:
            ops.append((item["key"], item["value"]))
    if header is None or not isinstance(header.get("summary"), str) or not header["summary"].strip():
        raise HubError(400, None, "commit: a header with a non-empty summary is required")
    return header, ops


def _stored_object(state: HubState, repo_dir: Path, oid: str) -> Path | None:
    """The LFS object ``oid`` this repo holds: uploaded (committed or not) or in one of its commits."""
    obj = repo_dir / "lfs-objects" / oid
    return obj if obj.is_file() else state.lfs_file(repo_dir, oid)


def _file_add(value: dict, where: str) -> _Add:
    encoding = value.get("encoding", "base64")
    content = value.get("content")
    if not isinstance(content, str) or encoding not in ("base64", "utf-8"):
        raise HubError(400, None, f"{where}: 'file' needs a string content, encoded base64 or utf-8")
    try:
        data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
    except binascii.Error as err:
        raise HubError(400, None, f"{where}: content is not base64") from err
    return _Add(data, lfs=False)


def _lfs_add(state: HubState, repo_dir: Path, value: dict, where: str) -> _Add:
    oid, size = value.get("oid"), value.get("size")
    if not (isinstance(oid, str) and _OID.fullmatch(oid)) or value.get("algo", "sha256") != "sha256":
        raise HubError(400, None, f"{where}: 'lfsFile' needs a sha256 oid")
    obj = _stored_object(state, repo_dir, oid)
    if obj is None:
        raise HubError(400, None, f"{where}: LFS object {oid} was never uploaded to this repo: upload it first")
    if size is not None and size != obj.stat().st_size:
        raise HubError(400, None, f"{where}: LFS object {oid} holds {obj.stat().st_size} bytes, not {size}")
    return _Add(obj, lfs=True, sha256=oid)


def _under(p: str, path: str, folder: bool) -> bool:
    return p.startswith(path + "/") if folder else p == path


def _plan_changes(state: HubState, repo_dir: Path, files: Mapping[str, dict],
                  ops: list[tuple[str, dict]]) -> tuple[dict[str, _Add], set[str]]:
    """The files to add and the paths to delete, applying ``ops`` in order on top of ``files``."""
    adds: dict[str, _Add] = {}
    gone: set[str] = set()
    label = f"{repo_dir.parent.name}/{repo_dir.name}"
    for key, value in ops:
        raw = value.get("path")
        if not isinstance(raw, str):
            raise HubError(400, None, f"commit: a {key} operation needs a path")
        path = check_relative(raw.rstrip("/") if key == "deletedFolder" else raw, label)
        if key == "file":
            adds[path] = _file_add(value, path)
        elif key == "lfsFile":
            adds[path] = _lfs_add(state, repo_dir, value, path)
        else:
            folder = key == "deletedFolder"
            added = [p for p in adds if _under(p, path, folder)]
            present = [p for p in files if _under(p, path, folder) and p not in gone]
            if not added and not present:
                raise HubError(404, "EntryNotFound", f"cannot delete {path}: no such {key[7:].lower()} in the "
                                                     "revision")
            for p in added:
                del adds[p]
            gone.update(present)
    return adds, gone


def _next_pr(repo_dir: Path) -> int:
    prs = repo_dir / "refs" / "pr"
    prs.mkdir(exist_ok=True)
    return 1 + max((int(p.name) for p in prs.iterdir() if p.name.isdigit()), default=0)


def _apply_commit(state: HubState, repo_dir: Path, rev: str, header: dict, ops: list[tuple[str, dict]],
                  create_pr: bool) -> tuple[str, int | None]:
    """Make the commit on top of ``rev``'s head and move ``rev`` to it, or with ``create_pr`` open ``refs/pr/N`` at
    it; (commit id, N or None). 412 if ``parentCommit`` is not the head."""
    ref = _ref_path(repo_dir, rev)
    if ref is None:
        raise HubError(400, None, f"commits go to a branch or to refs/pr/N, not to {printable(rev)!r}")
    description = header.get("description") or ""
    with state.repo_lock(repo_dir):
        if not ref.is_file():
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        head = ref.read_text().strip()
        parent = header.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and len(parent) >= 5
                                       and head.startswith(parent.lower())):
            raise HubError(412, None, COMMIT_RACE)
        adds, gone = _plan_changes(state, repo_dir, _meta(repo_dir / "commits" / f"{head}.json")["files"], ops)
        commit = _write_commit(repo_dir, head, adds, gone, header["summary"], str(description), stamp=_now())
        pr = _next_pr(repo_dir) if create_pr else None
        _write_atomic(repo_dir / "refs" / "pr" / str(pr) if pr else ref, commit + "\n")
    return commit, pr


def _metadata_errors(content: object) -> list[str]:
    """What is wrong with a README's YAML front matter (between the leading ``---`` lines): not YAML, or not a
    mapping; nothing if there is none."""
    import yaml

    if not isinstance(content, str):
        return ["expected {\"content\": the README's text}"]
    m = re.match(r"---[ \t]*\r?\n(.*?)(?:^|\n)---[ \t]*(?:\r?\n|$)", content, re.S)
    if m is None:
        return []
    try:
        data = yaml.safe_load(m[1])
    except yaml.YAMLError as err:
        return [f"invalid YAML in the metadata block: {printable(err, 300)}"]
    return [] if data is None or isinstance(data, dict) else ["the metadata block must be a YAML mapping"]


def _add_commit_routes(app: FastAPI, state: HubState) -> None:
    """validate-yaml (the client checks a README.md it commits), preupload and commit."""

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        errors = _metadata_errors(_json_object(await request.body()).get("content"))
        return JSONResponse({"errors": [{"message": e} for e in errors], "warnings": []},
                            status_code=400 if errors else 200)

    @app.post("/api/models/{org}/{name}/preupload/{rev}")
    async def preupload(org: str, name: str, rev: str, request: Request):
        _require_writer(state, request)
        items = _json_object(await request.body()).get("files")
        if not isinstance(items, list):
            raise HubError(400, None, "preupload: expected {\"files\": [...]}")

        def answer() -> dict:
            _, meta = _resolve(_open_repo(state, org, name, request)[0], rev)
            return {"files": [_upload_mode(item, meta["files"]) for item in items]}

        return await run_in_threadpool(answer)

    @app.get("/api/models/{org}/{name}/xet-write-token/{rev}")
    @app.get("/api/models/{org}/{name}/xet-read-token/{rev}")
    def no_xet(org: str, name: str, rev: str):
        raise HubError(404, None, "this local Hub does not speak Xet: upload LFS files as open binary files, or set "
                                  "HF_HUB_DISABLE_XET=1 before importing huggingface_hub")

    @app.post("/api/models/{org}/{name}/commit/{rev}")
    async def commit(org: str, name: str, rev: str, request: Request):
        _require_writer(state, request)
        header, ops = _commit_lines(await request.body())
        create_pr = request.query_params.get("create_pr", "").lower() in ("1", "true")

        def make() -> tuple[str, int | None]:
            repo_dir, _ = _open_repo(state, org, name, request)
            return _apply_commit(state, repo_dir, unquote(rev), header, ops, create_pr)

        commit_id, pr = await run_in_threadpool(make)
        base = f"{_hub_base(request)}/{org}/{name}"
        body = {"success": True, "commitOid": commit_id, "commitUrl": f"{base}/commit/{commit_id}", "hookOutput": ""}
        if pr:
            body.update(pullRequestUrl=f"{base}/discussions/{pr}", pullRequestRevision=f"refs/pr/{pr}")
        return body


# --- LFS: batch, uploads (basic and multipart), verify --------------------------------------------------------------


def _part_count(size: int, chunk: int) -> int:
    return -(-size // chunk)


def _batch_object(state: HubState, repo_dir: Path, item: object, hub: str, storage: str) -> dict:
    """The batch answer for one object: no actions if the repo holds it already, else where to upload it and how
    (basic, or multipart above the threshold) and where to verify it."""
    oid, size = (item.get("oid"), item.get("size")) if isinstance(item, dict) else (None, None)
    if not (isinstance(oid, str) and _OID.fullmatch(oid) and isinstance(size, int) and size >= 0):
        return {"oid": str(oid), "size": size if isinstance(size, int) else 0,
                "error": {"code": 422, "message": "expected a sha256 oid and a size"}}
    if (held := _stored_object(state, repo_dir, oid)) is not None:
        if held.stat().st_size == size:
            return {"oid": oid, "size": size}
        return {"oid": oid, "size": size,
                "error": {"code": 422, "message": f"object {oid} is held with {held.stat().st_size} bytes, not {size}"}}
    org, name = repo_dir.parent.name, repo_dir.name
    chunk = state.multipart_chunk_size if size > state.multipart_threshold else 0
    href = f"{storage}/lfs-upload/{org}/{name}/{oid}"
    query = f"size={size}&chunk={chunk}&sig={state.sign_upload(org, name, oid, size, chunk)}"
    upload: dict = {"href": f"{href}?{query}"}
    if chunk:  # href: the completion call; the header: the part URLs
        upload["header"] = {"chunk_size": str(chunk),
                            **{str(n): f"{href}?part={n}&{query}" for n in range(1, _part_count(size, chunk) + 1)}}
    return {"oid": oid, "size": size, "authenticated": True,
            "actions": {"upload": upload, "verify": {"href": f"{hub}/{org}/{name}.git/info/lfs/objects/verify"}}}


def _upload_target(state: HubState, org: str, name: str, oid: str, request: Request) -> tuple[Path, int, int]:
    """The repo folder, size and chunk size (0: basic) a signed upload URL names."""
    q = request.query_params
    size, chunk = q.get("size", ""), q.get("chunk", "0")
    if not (_NAME.fullmatch(org) and _NAME.fullmatch(name) and _OID.fullmatch(oid) and size.isdigit()
            and chunk.isdigit()):
        raise HubError(400, None, "malformed upload URL")
    if not hmac.compare_digest(q.get("sig", ""), state.sign_upload(org, name, oid, int(size), int(chunk))):
        raise HubError(403, None, "Access denied: bad or missing signature")
    repo_dir = state.root / org / name
    if not (repo_dir / "refs").is_dir():
        raise HubError(404, None, "No such repository")
    return repo_dir, int(size), int(chunk)


def _incoming(repo_dir: Path) -> Path:
    """A new temp file's path: hidden, in the object store's folder, so a rename stores it."""
    incoming = repo_dir / "lfs-objects" / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    return incoming / secrets.token_hex(8)


async def _receive(request: Request, dest: Path, cut_after: int | None) -> tuple[int, str, str] | None:
    """Stream the body into ``dest`` while hashing it (never whole in memory): (size, sha256, md5); None once more
    than ``cut_after`` bytes arrived (the connection is to be dropped)."""
    size, sha, md5 = 0, hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(dest, "wb") as f:
        async for chunk in request.stream():
            f.write(chunk)
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
            if cut_after is not None and size > cut_after:
                return None
    return size, sha.hexdigest(), md5.hexdigest()


class _Hangup(Response):
    """Starts an answer and drops the connection mid-body, as a dying server or network does."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"64")]})
        await send({"type": "http.response.body", "body": b"-", "more_body": True})
        # returning with the answer incomplete: uvicorn closes the connection


def _check_received(oid: str, size: int, got_size: int, got_sha: str) -> None:
    if got_size != size:
        raise HubError(400, None, f"size mismatch: received {got_size} bytes, the batch announced {size}")
    if got_sha != oid:
        raise HubError(400, None, f"sha256 mismatch: the body hashes to {got_sha}, not to the oid {oid}")


async def _store_upload(state: HubState, request: Request, repo_dir: Path, oid: str, size: int,
                        part: int | None, chunk: int) -> Response:
    """Receive a basic upload (``part`` None: the whole object, stored once its sha256 and size match) or part
    ``part`` of a multipart one (kept aside until the completion call); a temp file until checked."""
    tmp = _incoming(repo_dir)
    try:
        got = await _receive(request, tmp, state.take_cut(request.scope["path"]))
        if got is None:
            return _Hangup()
        got_size, sha, md5 = got
        if part is None:
            _check_received(oid, size, got_size, sha)
            os.replace(tmp, repo_dir / "lfs-objects" / oid)
        else:
            expected = min(chunk, size - (part - 1) * chunk)
            if got_size != expected:
                raise HubError(400, None, f"part {part}: received {got_size} bytes, expected {expected}")
            parts = repo_dir / "lfs-objects" / ".parts" / oid
            parts.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, parts / str(part))
    except ClientDisconnect:
        return Response(status_code=400)  # nobody reads it: the client is gone
    finally:
        tmp.unlink(missing_ok=True)
    if state.delay_uploads > 0:
        await asyncio.sleep(state.delay_uploads)
    return Response(status_code=200, headers={"ETag": f'"{oid if part is None else md5}"'})


def _assemble(repo_dir: Path, oid: str, size: int, chunk: int, parts: object) -> None:
    """Complete a multipart upload: the parts (numbered 1..N, their ETags as answered) joined into the object,
    stored once its sha256 and size match."""
    target, held = repo_dir / "lfs-objects" / oid, repo_dir / "lfs-objects" / ".parts" / oid
    if target.is_file() and target.stat().st_size == size:
        return  # a completion retried after it succeeded
    count = _part_count(size, chunk)
    listed = parts if isinstance(parts, list) and all(isinstance(p, dict) for p in parts) else []
    etags = {p.get("partNumber"): str(p.get("etag", "")).strip('"') for p in listed}
    if len(listed) != count or set(etags) != set(range(1, count + 1)):
        raise HubError(400, None, f"completion: expected parts 1..{count}, each once, with their ETags")
    if missing := [n for n in range(1, count + 1) if not (held / str(n)).is_file()]:
        raise HubError(400, None, f"completion: part {missing[0]} was never uploaded")
    tmp, sha, total = _incoming(repo_dir), hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for n in range(1, count + 1):
                md5 = hashlib.md5(usedforsecurity=False)
                for block in _read_chunks(held / str(n)):
                    out.write(block)
                    sha.update(block)
                    md5.update(block)
                    total += len(block)
                if md5.hexdigest() != etags[n]:
                    raise HubError(400, None, f"completion: part {n}'s ETag does not match the part received")
        try:
            _check_received(oid, size, total, sha.hexdigest())
        except HubError:
            shutil.rmtree(held, ignore_errors=True)  # wrong bytes: start again
            raise
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(held, ignore_errors=True)


def _add_lfs_routes(app: FastAPI, state: HubState) -> None:
    """The LFS batch and verify calls (Hub origin, a write token) and the uploads (storage origin, signed URLs)."""

    @app.post("/{org}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch(org: str, name: str, request: Request):
        _require_writer(state, request)
        body = _json_object(await request.body())
        if body.get("operation") != "upload" or not isinstance(body.get("objects"), list):
            raise HubError(400, None, "LFS batch: only {\"operation\": \"upload\", \"objects\": [...]} is served")
        hub = _hub_base(request)
        storage = state.storage_url or hub

        def answer() -> list[dict]:
            repo_dir, _ = _open_repo(state, org, name, request)
            return [_batch_object(state, repo_dir, item, hub, storage) for item in body["objects"]]

        objects = await run_in_threadpool(answer)
        parted = any("chunk_size" in o.get("actions", {}).get("upload", {}).get("header", {}) for o in objects)
        return JSONResponse({"transfer": "multipart" if parted else "basic", "objects": objects,
                             "hash_algo": "sha256"}, media_type="application/vnd.git-lfs+json")

    @app.post("/{org}/{name}.git/info/lfs/objects/verify")
    async def lfs_verify(org: str, name: str, request: Request):
        _require_writer(state, request)
        body = _json_object(await request.body())
        oid, size = body.get("oid"), body.get("size")
        repo_dir, _ = await run_in_threadpool(_open_repo, state, org, name, request)
        held = _stored_object(state, repo_dir, oid) if isinstance(oid, str) and _OID.fullmatch(oid) else None
        if held is None or held.stat().st_size != size:
            raise HubError(404, None, f"object {printable(oid)} of {printable(size)} bytes not found")
        return {}

    @app.put("/lfs-upload/{org}/{name}/{oid}")
    async def upload(org: str, name: str, oid: str, request: Request):
        repo_dir, size, chunk = _upload_target(state, org, name, oid, request)
        part = request.query_params.get("part")
        if (part is None) != (chunk == 0):
            raise HubError(400, None, "an object over the multipart threshold goes up in parts, others whole")
        if part is not None and not (part.isdigit() and 1 <= int(part) <= _part_count(size, chunk)):
            raise HubError(400, None, f"no part {printable(part)} in an upload of {_part_count(size, chunk)}")
        return await _store_upload(state, request, repo_dir, oid, size, None if part is None else int(part), chunk)

    @app.post("/lfs-upload/{org}/{name}/{oid}")
    async def complete_upload(org: str, name: str, oid: str, request: Request):
        repo_dir, size, chunk = _upload_target(state, org, name, oid, request)
        if chunk == 0:
            raise HubError(400, None, "completion: not a multipart upload")
        parts = _json_object(await request.body()).get("parts")
        await run_in_threadpool(_assemble, repo_dir, oid, size, chunk, parts)
        return {}


@dataclass(frozen=True)
class HubServer:
    """A running hub (see :func:`serve_hub`): its URLs, and the test hooks of its :class:`HubState`."""

    url: str  # the HF_ENDPOINT value
    storage_url: str
    root: Path
    state: HubState

    def fail_next(self, n: int, status: int = 429, retry_after: int | None = 1, path_contains: str | None = None):
        self.state.fail_next(n, status, retry_after, path_contains)

    def cut_uploads(self, n: int = 1, after_bytes: int = 0, path_contains: str | None = None) -> None:
        self.state.cut_uploads(n, after_bytes, path_contains)

    def set_fault(self, repo: str, path: str, fault: str | None, times: int | None = None) -> None:
        self.state.set_fault(repo, path, fault, times)

    @property
    def requests(self) -> list[Seen]:
        return self.state.requests()


@contextlib.contextmanager
def serve_hub(root: str | Path, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0,
              write_tokens: Iterable[str] | None = None, multipart_threshold: int = MULTIPART_THRESHOLD,
              multipart_chunk_size: int = MULTIPART_CHUNK) -> Iterator[HubServer]:
    """Serve ``root`` with uvicorn on a background thread (IPv4; the Hub on ``port`` or a free one, LFS storage
    and uploads on a second free port) until the block ends. ``write_tokens``: the tokens that may write (None: any
    ``hf_`` token); LFS objects over ``multipart_threshold`` bytes go up in parts of ``multipart_chunk_size``."""
    import uvicorn

    sockets = [socket.create_server((host, port or 0)), socket.create_server((host, 0))]
    url, storage_url = (f"http://{host}:{s.getsockname()[1]}" for s in sockets)
    app = create_app(root, storage_url=storage_url, write_tokens=write_tokens, multipart_threshold=multipart_threshold,
                     multipart_chunk_size=multipart_chunk_size)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True, name="hubserver")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RequantError(f"the hub server on {url} did not start within {timeout:.0f}s")
            time.sleep(0.02)
        yield HubServer(url, storage_url, Path(root), app.state.hub)
    finally:
        server.should_exit = True
        thread.join(timeout)
        for s in sockets:
            s.close()


def start_hub_process(root: str | Path, log: str | Path, write_tokens: Iterable[str] = (),
                      timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``requant hub serve ROOT`` as a process of its own on a free loopback port (benchmarks measure the client
    apart from the server), its output appended to ``log``; returns the process and its URL once it answers."""
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tokens = [arg for token in write_tokens for arg in ("--write-token", token)]
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("requant")), "hub", "serve", str(root), "--port",
                                 str(port), *tokens], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"{url}/api/models/none/none", timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RequantError(f"the local Hub (requant hub serve {root}) did not answer within {timeout:.0f}s; see {log}")
