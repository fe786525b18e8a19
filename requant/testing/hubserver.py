"""A local stand-in for the Hugging Face Hub: enough of its HTTP protocol that the real ``huggingface_hub``
client (``HfApi``, ``hf_hub_download``, ``snapshot_download``, ``HfFileSystem``) works against it through
``HF_ENDPOINT`` (or ``endpoint=``). A test and demo component, like the embedded S3 server of :mod:`requant.testing.seaweed`.

Data model, no git: ``ROOT/ORG/REPO/refs/NAME`` holds a commit id; ``commits/COMMIT/`` holds that revision's
files and ``commits/COMMIT.json`` its metadata (parent, message, date and, per file, size, git blob id and for
LFS files the sha256, all computed once by :func:`publish`, never per request); an optional ``repo.json`` holds
settings: ``{"gated": true, "private": false, "tokens": ["hf_..."]}`` (tokens that may read).

As on the Hub, LFS files (``*.safetensors``, ``*.bin``, or over 10 MiB) answer ``resolve`` with a 302 to a signed
storage URL, carrying ``X-Linked-Size`` and ``X-Linked-Etag``. :func:`serve_hub` serves that storage on a second
port, like the Hub's CDN: the client follows same-origin redirects on HEAD (it would then miss those headers) and
drops the token off the Hub origin. Errors carry the ``X-Error-Code`` the client maps to its exception classes.
Gated repos list their files openly; downloads need a listed token (401 without a token, 403 with another).
Model repos only; ref names without '/'; tree listings are not paginated.

Faults, for tests (:meth:`HubState.set_fault`, :meth:`HubState.hide_digests`): a file whose bytes, size or ETag
changed under a pinned commit, a body corrupted in transit, a listing that publishes no digest. ``publish(...,
lfs=False)`` keeps every file in git, as a mirror serving a git repository does (the listing names git blob ids).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from requant.errors import RequantError, printable
from requant.io.paths import check_relative

LFS_SUFFIXES = (".safetensors", ".bin")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1 << 20  # read buffer for hashing and for streaming responses
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # org, repo and ref names: no '/', no '..'
_COMMIT = re.compile(r"[0-9a-f]{40}")
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


def _describe(path: Path, rel: str, lfs: bool = True) -> dict:
    """Size and git blob id; for LFS files the sha256, and the blob id and size of the pointer git stores."""
    size = path.stat().st_size
    if not (lfs and (rel.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE)):
        return {"size": size, "oid": _git_blob_id(size, _read_chunks(path))}
    h = hashlib.sha256()
    for chunk in _read_chunks(path):
        h.update(chunk)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{h.hexdigest()}\nsize {size}\n".encode()
    return {"size": size, "oid": _git_blob_id(len(pointer), [pointer]),
            "lfs": {"sha256": h.hexdigest(), "pointerSize": len(pointer)}}


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no copy of multi-GB files; a published file must then not be rewritten in place
    except OSError:
        shutil.copyfile(src, dst)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _repo_dir(root: Path, repo: str) -> Path:
    org, _, name = repo.partition("/")
    if not (_NAME.fullmatch(org) and _NAME.fullmatch(name)):
        raise RequantError(f"repo {repo!r}: expected ORG/REPO (letters, digits, '.', '_', '-')")
    return Path(root) / org / name


def _ref_name(name: str) -> str:
    if not _NAME.fullmatch(name) or _COMMIT.fullmatch(name):
        raise RequantError(f"ref {name!r}: letters, digits, '.', '_', '-', and not a commit id")
    return name


def publish(root: str | Path, repo: str, files: Mapping[str, bytes | os.PathLike], branch: str = "main",
            message: str = "Upload files", delete: Iterable[str] = (), lfs: bool = True) -> str:
    """Commit ``files`` (path in repo -> bytes, or a local file, hard-linked where possible) on top of ``branch``'s
    head, removing ``delete``; move the branch to the new commit and return its id. ``lfs`` False: the new files are
    kept in git (listed by git blob id, no sha256), whatever their name or size."""
    repo_dir = _repo_dir(Path(root), repo)
    commits = repo_dir / "commits"
    head = repo_dir / "refs" / _ref_name(branch)
    parent = head.read_text().strip() if head.is_file() else None
    entries = dict(_meta(commits / f"{parent}.json")["files"]) if parent else {}
    for rel in delete:
        if entries.pop(check_relative(rel, repo), None) is None:
            raise RequantError(f"{repo}: cannot delete {rel!r}, not in {branch}")
    changed = {check_relative(rel, repo): content for rel, content in files.items()}
    if wrong := [rel for rel, c in changed.items() if not isinstance(c, (bytes, bytearray, memoryview))
                 and not (isinstance(c, os.PathLike) and Path(c).is_file())]:
        raise RequantError(f"{repo}/{wrong[0]}: content must be bytes or the Path of an existing file")
    dirs = {rel.rsplit("/", i)[0] for rel in (*entries, *changed) for i in range(1, rel.count("/") + 1)}
    if clash := dirs & {*entries, *changed}:
        raise RequantError(f"{repo}: {sorted(clash)[0]!r} would be both a file and a folder")
    commits.mkdir(parents=True, exist_ok=True)
    head.parent.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=commits))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would become the commit folder's mode
        for rel in entries.keys() | changed.keys():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel not in changed:
                _place(commits / parent / rel, staging / rel)
            elif isinstance(changed[rel], os.PathLike):
                _place(Path(changed[rel]), staging / rel)
            else:
                (staging / rel).write_bytes(changed[rel])
            if rel in changed:
                entries[rel] = _describe(staging / rel, rel, lfs)
        digest = hashlib.sha1(f"parent {parent or ''}\n{message}\n".encode())
        for rel in sorted(entries):
            digest.update(f"{rel}\0{entries[rel].get('lfs', {}).get('sha256') or entries[rel]['oid']}\n".encode())
        commit = digest.hexdigest()
        if not (commits / commit).is_dir():
            date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
            _write_atomic(commits / f"{commit}.json", json.dumps(
                {"parent": parent, "message": message, "date": date, "files": dict(sorted(entries.items()))}))
            os.replace(staging, commits / commit)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_atomic(head, commit + "\n")  # last: readers resolve the branch only to a complete commit
    return commit


def publish_dir(root: str | Path, repo: str, directory: str | os.PathLike, branch: str = "main",
                message: str = "Upload checkpoint", lfs: bool = True) -> str:
    """Commit every file under ``directory`` (hard-linked where possible) as the new head of ``branch``; files of
    the branch's previous head that the directory lacks are removed (``lfs``: see :func:`publish`). Returns the
    commit id."""
    src = Path(directory)
    if not src.is_dir():
        raise RequantError(f"{src}: not a directory")
    files = {p.relative_to(src).as_posix(): p for p in sorted(src.rglob("*")) if p.is_file() and not p.is_symlink()}
    head = _repo_dir(Path(root), repo) / "refs" / _ref_name(branch)
    old = _meta(head.parent.parent / "commits" / f"{head.read_text().strip()}.json")["files"] if head.is_file() else {}
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

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit

    def response(self, extra: Mapping[str, str] | None = None) -> JSONResponse:
        # header values must be latin-1 and single-line; names in messages come from URLs
        headers = {"X-Error-Message": printable(self.message, 300).encode("ascii", "backslashreplace").decode(),
                   **(extra or {})}
        headers.update({k: v for k, v in (("X-Error-Code", self.code), ("X-Repo-Commit", self.commit)) if v})
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it, for tests to assert on."""

    method: str
    path: str
    status: int
    range: str | None
    authorization: bool


class HubState:
    """Per-app state: the data root, injected failures and the request log."""

    def __init__(self, root: Path, storage_url: str | None):
        self.root, self.storage_url = root, storage_url
        self.secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._failures: list[tuple[int, int | None, str | None]] = []  # status, Retry-After, path part
        self._seen: list[Seen] = []
        self._lfs: dict[Path, dict[str, Path]] = {}
        self._faults: dict[tuple[str, str], list] = {}  # (ORG/REPO, path) -> [fault, bodies left or None]
        self._hidden: set[str] = set()  # repos whose listings publish no digest
        self.ignore_ranges = False  # answer every GET with the whole file, as some mirrors do

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
        """Answer the next ``n`` requests (whose path contains ``path_contains``, if given) with ``status``."""
        if n < 0 or not 400 <= status <= 599:
            raise RequantError(f"fail_next: need n >= 0 and an error status, got n={n}, status={status}")
        with self._lock:
            self._failures += [(status, retry_after, path_contains)] * n

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def take_failure(self, path: str) -> tuple[int, int | None, str | None] | None:
        with self._lock:
            i = next((i for i, f in enumerate(self._failures) if f[2] is None or f[2] in path), None)
            return None if i is None else self._failures.pop(i)

    def record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def sign(self, org: str, name: str, sha256: str) -> str:
        return hmac.new(self.secret, f"{org}/{name}/{sha256}".encode(), "sha256").hexdigest()

    def lfs_file(self, repo_dir: Path, sha256: str) -> Path | None:
        found = self._lfs.get(repo_dir, {}).get(sha256)
        if found is None:  # a new commit may have added it: rescan this repo's (small) commit indexes
            table = {e["lfs"]["sha256"]: repo_dir / "commits" / meta.stem / rel
                     for meta in (repo_dir / "commits").glob("*.json")
                     for rel, e in _meta(meta)["files"].items() if "lfs" in e}
            self._lfs[repo_dir] = table
            found = table.get(sha256)
        return found


class _Recorder:
    """ASGI middleware: answers injected failures and logs every request with its status."""

    def __init__(self, app, state: HubState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
    return auth[7:].strip() if auth[:7].lower() == "bearer " else None


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


def create_app(root: str | Path, storage_url: str | None = None) -> FastAPI:
    """The Hub app over ``root``. ``storage_url``: the origin LFS redirects point to; give it an origin other
    than the app's (see the module docstring); by default the app's own."""
    state = HubState(Path(root), storage_url.rstrip("/") if storage_url else None)
    app = FastAPI(title="requant hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = state
    app.add_middleware(_Recorder, state=state)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError):
        return exc.response()

    def open_repo(org: str, name: str, request: Request, download: bool = False) -> tuple[Path, dict]:
        repo_dir = state.root / org / name
        if not (_NAME.fullmatch(org) and _NAME.fullmatch(name) and (repo_dir / "refs").is_dir()):
            raise HubError(404, "RepoNotFound", "Repository not found")
        settings = json.loads(p.read_text()) if (p := repo_dir / "repo.json").is_file() else {}
        token = _token(request)
        if token is not None and not token.startswith("hf_"):
            raise HubError(401, None, "Invalid credentials in Authorization header")
        allowed = token is not None and token in settings.get("tokens", ())
        if settings.get("private") and not allowed:
            raise HubError(401 if token is None else 404, "RepoNotFound", "Repository not found")
        if download and settings.get("gated") and not allowed:
            if token is None:
                raise HubError(401, "GatedRepo", f"Access to model {org}/{name} is restricted. You must have access "
                                                 "to it and be authenticated to access it. Please log in.")
            raise HubError(403, "GatedRepo", f"Access to model {org}/{name} is restricted and you are not in the "
                                             "authorized list.")
        return repo_dir, settings

    def resolve(repo_dir: Path, rev: str) -> tuple[str, dict]:
        commit = rev if _COMMIT.fullmatch(rev) else None
        if commit is None and _NAME.fullmatch(rev) and (ref := repo_dir / "refs" / rev).is_file():
            commit = ref.read_text().strip()
        if commit is None or not (meta := repo_dir / "commits" / f"{commit}.json").is_file():
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit, _meta(meta)

    @app.get("/api/models/{org}/{name}")
    @app.get("/api/models/{org}/{name}/revision/{rev:path}")
    def model_info(org: str, name: str, request: Request):
        repo_dir, settings = open_repo(org, name, request)
        commit, meta = resolve(repo_dir, request.path_params.get("rev", "main"))
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
        commit, meta = resolve(open_repo(org, name, request)[0], rev)
        files, folders, path = meta["files"], _folders(meta["files"]), request.path_params.get("path", "").strip("/")
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
        commit, meta = await run_in_threadpool(lambda: resolve(open_repo(org, name, request)[0], rev))
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
        repo_dir, _ = open_repo(org, name, request, download=True)
        commit, meta = resolve(repo_dir, rev)
        e = meta["files"].get(path)
        if e is None:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path}", commit)
        headers = {"X-Repo-Commit": commit}
        if "lfs" not in e:
            fault = state.fault(f"{org}/{name}", path, body=request.method == "GET")
            return _file_response(request, repo_dir / "commits" / commit / path, e["size"], e["oid"], headers,
                                  state.ignore_ranges, fault)
        sha = e["lfs"]["sha256"]
        base = state.storage_url or str(request.base_url).rstrip("/")
        location = f"{base}/lfs-storage/{org}/{name}/{sha}?sig={state.sign(org, name, sha)}"
        size, etag = _advertised(e["size"], sha, state.fault(f"{org}/{name}", path, body=False))
        return Response(status_code=302, headers={**headers, "ETag": f'"{e["oid"]}"', "Location": location,
                                                  "X-Linked-Size": str(size), "X-Linked-Etag": f'"{etag}"'})

    return app


@dataclass(frozen=True)
class HubServer:
    """A running hub (see :func:`serve_hub`): its URLs, and the test hooks of its :class:`HubState`."""

    url: str  # the HF_ENDPOINT value
    storage_url: str
    root: Path
    state: HubState

    def fail_next(self, n: int, status: int = 429, retry_after: int | None = 1, path_contains: str | None = None):
        self.state.fail_next(n, status, retry_after, path_contains)

    def set_fault(self, repo: str, path: str, fault: str | None, times: int | None = None) -> None:
        self.state.set_fault(repo, path, fault, times)

    @property
    def requests(self) -> list[Seen]:
        return self.state.requests()


@contextlib.contextmanager
def serve_hub(root: str | Path, host: str = "127.0.0.1", port: int | None = None,
              timeout: float = 30.0) -> Iterator[HubServer]:
    """Serve ``root`` with uvicorn on a background thread (IPv4; the Hub on ``port`` or a free one, LFS storage
    on a second free port) until the block ends."""
    import uvicorn

    sockets = [socket.create_server((host, port or 0)), socket.create_server((host, 0))]
    url, storage_url = (f"http://{host}:{s.getsockname()[1]}" for s in sockets)
    app = create_app(root, storage_url=storage_url)
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
