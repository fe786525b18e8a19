"""Hugging Face Hub upstreams: ``hf://ORG/REPO@REVISION``, read by byte range through ``huggingface_hub``.

Everything goes through the Hub's own client: ``HfApi`` for the commit a revision names and the file list
(sizes, LFS sha256, git blob ids), its HTTP session and backoff for byte ranges (auth from ``HF_TOKEN`` or the
token file, bounded retries honouring ``Retry-After``, the Hub's redirect of LFS files to its storage), and its error
classes, turned here into one-line errors. ``HF_ENDPOINT`` selects the server (a mirror, or requant's local Hub).

A branch or tag is resolved to its commit once (:meth:`HfStorage.pinned_uri`); a conversion passes the pinned
URI to its layer jobs, so every job reads the same revision even if the branch moves meanwhile. Every range read
of an LFS file checks the Hub's size and sha256 for it against those listed at pinning time: a file changed under a
pinned revision fails the read, naming the file. A whole-file read is checked against the digest the Hub publishes
for the file (:meth:`HfStorage.published_digest`: the LFS sha256, else the git blob id; a mirror serving a git
repository publishes only the latter); a file it publishes neither for is only size-checked, and callers decide
whether to accept that (a conversion needs ``--unverified``, a mirror refuses).
A server that ignores ``Range`` (some mirrors answer with the whole file) is tolerated: the response is streamed
and only the wanted bytes are kept.

Remote code in the repository is only ever copied, never imported. The token is sent only to the Hub's origin
(the client drops it on the redirect to storage) and never appears in messages or records.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from requant import settings
from requant.errors import CheckpointError, RequantError, printable
from requant.io.paths import check_relative

CHUNK = 1 << 20
LOCATION_TTL_S = 300.0  # how long a storage URL the Hub redirected to is reused before resolving again
RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # the client's own choice for downloads
T = TypeVar("T")


def parse_hf_uri(uri: str) -> tuple[str, str]:
    body = uri[len("hf://") :]
    repo, sep, revision = body.partition("@")
    if not sep or not revision:
        raise RequantError(f"{uri}: pin a revision, e.g. hf://moonshotai/Kimi-K2.6@main or @<commit>")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise RequantError(f"{uri}: expected hf://ORG/REPO@REVISION")
    return repo, revision


def hub_endpoint() -> str:
    """The Hub's URL: ``HF_ENDPOINT`` as set now (the client reads it once, at import), else huggingface.co."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _retries() -> int:
    return settings.HF_RETRIES.get()


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def hub_failure(exc: BaseException, what: str, endpoint: str) -> RequantError:
    """A one-line error for what the Hub client raised while reading ``what`` (a repo, revision or file URI)."""
    import httpx2 as httpx  # huggingface_hub's HTTP library
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RequantError):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        if not _has_token():
            return RequantError(f"{what}: gated repository; set HF_TOKEN to a token of an account that was granted "
                                "access")
        return RequantError(f"{what}: gated repository; the token in HF_TOKEN was refused (HTTP {status}): request "
                            "access on the repository's page, or use a token of an account that has it")
    if isinstance(exc, RevisionNotFoundError):
        return RequantError(f"{what}: no such revision (a branch, tag or commit of the repository)")
    if isinstance(exc, EntryNotFoundError):
        return CheckpointError(what, "file is missing at this revision")
    if isinstance(exc, RepositoryNotFoundError):
        hint = "or the token in HF_TOKEN cannot see it" if _has_token() else "or it is private: set HF_TOKEN"
        return RequantError(f"{what}: no such repository on {endpoint} ({hint})")
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return RequantError(f"{what}: {endpoint} refused the credentials (HTTP {status}); check HF_TOKEN")
    if isinstance(exc, HfHubHTTPError):
        return RequantError(f"{what}: {endpoint} answered HTTP {status} after {_retries()} retries "
                            f"({settings.HF_RETRIES.name} sets how many)")
    if isinstance(exc, (httpx.TransportError, OSError)):
        return RequantError(f"{what}: cannot reach the Hub at {endpoint} ({type(exc).__name__}: "
                            f"{printable(str(exc), 160)}); is HF_ENDPOINT right?")
    return RequantError(f"{what}: {type(exc).__name__}: {printable(str(exc), 200)}")


@contextmanager
def hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Turn anything the Hub client raises inside the block into :func:`hub_failure`'s one-line error."""
    try:
        yield
    except RequantError:
        raise
    except Exception as exc:
        raise hub_failure(exc, what, endpoint) from exc


def _api(endpoint: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)  # token: HF_TOKEN or the token file, as the client finds it


def _with_retries(call: Callable[[], T]) -> T:
    """``call()`` (an ``HfApi`` request, which the client does not retry) retried like the client's downloads:
    on 408/429/5xx and transport errors, up to REQUANT_HF_RETRIES times, waiting ``Retry-After`` when given."""
    import httpx2 as httpx
    from huggingface_hub.errors import HfHubHTTPError

    wait = 1.0
    for attempt in range(_retries() + 1):
        try:
            return call()
        except (HfHubHTTPError, httpx.TransportError) as exc:
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
            if attempt == _retries() or (isinstance(exc, HfHubHTTPError) and status not in RETRY_STATUS):
                raise
            after = (response.headers.get("Retry-After", "") if response is not None else "").strip()
            time.sleep(float(after) + 1 if after.isdigit() else wait)
            wait = min(wait * 2, 8.0)
    raise AssertionError("unreachable")


def resolve_revision(repo: str, revision: str, endpoint: str | None = None) -> str:
    """The commit id that ``revision`` (branch, tag or commit) of ``repo`` names on the Hub now."""
    endpoint = endpoint or hub_endpoint()
    with hub_errors(f"hf://{repo}@{revision}", endpoint):
        return _with_retries(lambda: _api(endpoint).model_info(repo, revision=revision)).sha


@lru_cache(maxsize=16)
def list_revision(endpoint: str, repo: str, commit: str) -> dict[str, dict]:
    """Every file of ``repo`` at ``commit``: size, git blob id and, for LFS files, the sha256 the Hub publishes.
    A commit never changes, so a process lists it once (layer jobs on one worker share the listing)."""
    from huggingface_hub.hf_api import RepoFile

    files = {}
    with hub_errors(f"hf://{repo}@{commit}", endpoint):
        for entry in _with_retries(lambda: list(_api(endpoint).list_repo_tree(repo, revision=commit, recursive=True))):
            if isinstance(entry, RepoFile):
                rel = check_relative(entry.path, f"hf://{repo}@{commit}")  # refuse traversal in names the Hub sends
                files[rel] = {"size": entry.size, "blob_id": entry.blob_id or None,
                              "sha256": entry.lfs.sha256 if entry.lfs else None}
    return files


def git_blob_hasher(size: int):
    """A hash object that, fed a file's ``size`` bytes, gives git's blob id: what the Hub publishes for files
    kept in git rather than LFS."""
    return hashlib.sha1(b"blob %d\0" % size)


_ETAG = re.compile(r'^(?:W/)?"?([^"]*)"?$')
NO_DIGEST = "the Hub publishes no digest for it (neither an LFS sha256 nor a git blob id): its bytes cannot be checked"


class HfStorage:
    """The read side of :class:`requant.io.storage.Storage` for one pinned revision of a Hub repository."""

    def __init__(self, uri: str, endpoint: str | None = None):
        self.repo, self.revision = parse_hf_uri(uri)
        self.uri = uri
        self.endpoint = (endpoint or hub_endpoint()).rstrip("/")
        self._commit: str | None = self.revision if re.fullmatch(r"[0-9a-f]{40}", self.revision) else None
        self._locations: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "endpoint": self.endpoint, "_commit": self._commit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["endpoint"])
        self._commit = state["_commit"]

    # --- the revision ---------------------------------------------------------------------------------
    @property
    def commit(self) -> str:
        """The commit this storage reads (a branch or tag is resolved once, on first use)."""
        if self._commit is None:
            self._commit = resolve_revision(self.repo, self.revision, self.endpoint)
        return self._commit

    def pinned_uri(self) -> str:
        return f"hf://{self.repo}@{self.commit}"

    def _files(self) -> dict[str, dict]:
        return list_revision(self.endpoint, self.repo, self.commit)

    def _entry(self, path: str) -> dict:
        entry = self._files().get(check_relative(path, self.uri))
        if entry is None:
            raise CheckpointError(f"{self.uri}/{path}", f"file is missing at commit {self.commit[:12]}")
        return entry

    # --- reading ----------------------------------------------------------------------------------------
    def _resolve_url(self, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, path, revision=self.commit, endpoint=self.endpoint)

    @contextmanager
    def _get(self, path: str, start: int | None = None, end: int | None = None):
        """An open streamed response for ``path`` (bytes ``start..end`` if given), checked against the listing."""
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        entry = self._entry(path)
        where = f"{self.uri}/{path}"
        with self._lock:
            cached = self._locations.get(path)
        direct = cached is not None and time.monotonic() - cached[1] < LOCATION_TTL_S
        url = cached[0] if direct else self._resolve_url(path)
        headers = {} if direct else build_hf_headers()  # a signed storage URL takes no token
        if start is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        expired = False
        with hub_errors(where, self.endpoint):
            with http_stream_backoff("GET", url, headers=headers, max_retries=_retries(),
                                     retry_on_status_codes=RETRY_STATUS) as response:
                if direct and response.status_code in (401, 403, 404, 410):  # the signed URL expired
                    expired = True
                else:
                    hf_raise_for_status(response)
                    self._check_identity(response, entry, where)
                    if entry["sha256"] and not direct and response.history:  # remember where the Hub sent us
                        with self._lock:
                            self._locations[path] = (str(response.url), time.monotonic())
                    yield response
        if expired:  # resolve through the Hub again
            with self._lock:
                self._locations.pop(path, None)
            with self._get(path, start, end) as response:
                yield response

    def _check_identity(self, response, entry: dict, where: str) -> None:
        """The Hub names an LFS file's sha256 and size on every answer: they must be the ones listed at pinning."""
        first = response.history[0] if response.history else response
        if entry["sha256"] is None:
            return
        etag = first.headers.get("X-Linked-Etag") or (first.headers.get("ETag") if not response.history else None)
        size = first.headers.get("X-Linked-Size")
        if etag and (m := _ETAG.match(etag)) and m.group(1) != entry["sha256"]:
            raise CheckpointError(where, f"changed under a pinned revision: the Hub now serves sha256 "
                                         f"{m.group(1)[:16]}..., listed as {entry['sha256'][:16]}...")
        if size and size.isdigit() and int(size) != entry["size"]:
            raise CheckpointError(where, f"changed under a pinned revision: the Hub now serves {size} bytes, "
                                         f"listed as {entry['size']}")

    def _read(self, path: str, start: int, end: int, sink: Callable[[bytes], None]) -> None:
        """Feed bytes ``start..end`` of ``path`` to ``sink``; a whole-file answer to a range is skipped through."""
        want, where, listed = end - start, f"{self.uri}/{path}", self._entry(path)["size"]
        with self._get(path, start, end) as response:
            if response.status_code == 206:
                m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    raise CheckpointError(where, f"the server answered range {start}..{end} with "
                                                 f"{response.headers.get('Content-Range')!r}")
                total, skip = m.group(3), 0
            else:
                total = response.headers.get("Content-Length", "*")
                skip = start  # the server ignored Range: stream past the bytes before it, keep none of them
            if total.isdigit() and int(total) != listed:
                raise CheckpointError(where, f"changed under a pinned revision: the Hub now serves {total} bytes, "
                                             f"listed as {listed}")
            for chunk in response.iter_bytes(CHUNK):
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                if chunk:
                    chunk = chunk[:want]
                    sink(chunk)
                    want -= len(chunk)
                if want == 0:
                    return
        raise CheckpointError(where, f"short read: wanted bytes {start}..{end}, the file ends {want} bytes early")

    def read_into(self, path: str, start: int, buf: bytearray) -> None:
        view, done = memoryview(buf), 0

        def put(chunk: bytes) -> None:
            nonlocal done
            view[done:done + len(chunk)] = chunk
            done += len(chunk)

        self._read(path, start, start + len(buf), put)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        buf = bytearray(end - start)
        self.read_into(path, start, buf)
        return bytes(buf)

    def published_digest(self, path: str) -> tuple[str, str] | None:
        """What the Hub publishes to check the file's bytes against: ``("sha256", hex)`` for an LFS file,
        ``("git blob id", hex)`` for one kept in git; None when its listing names neither."""
        entry = self._entry(path)
        if entry["sha256"]:
            return "sha256", entry["sha256"]
        return ("git blob id", entry["blob_id"]) if entry["blob_id"] else None

    def iter_file(self, path: str) -> Iterator[bytes]:
        """The whole file in chunks, checked: its sha256 (LFS) or git blob id must be the published one (a file the
        Hub publishes neither for: only its size)."""
        entry, where = self._entry(path), f"{self.uri}/{path}"
        kind, expected = self.published_digest(path) or (None, None)
        digest = hashlib.sha256() if kind == "sha256" else git_blob_hasher(entry["size"])
        size = 0
        with self._get(path) as response:
            for chunk in response.iter_bytes(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                yield chunk
        if size != entry["size"]:
            raise CheckpointError(where, f"read {size} bytes, the Hub lists {entry['size']}")
        if expected is not None and digest.hexdigest() != expected:
            raise CheckpointError(where, f"the bytes read ({kind} {digest.hexdigest()[:16]}...) differ from the "
                                         f"published {expected[:16]}...: corrupted in storage or in transit")

    def checked_sha256(self, path: str) -> tuple[str, bool]:
        """The sha256 of the file as downloaded now, and whether those bytes matched the digest the Hub publishes
        (:meth:`iter_file` raises when they differ; False for a file it publishes none for)."""
        published = self.published_digest(path)
        if published is not None and published[0] == "sha256":
            for _ in self.iter_file(path):  # checked against the published sha256, which is then the file's
                pass
            return published[1], True
        h = hashlib.sha256()
        for chunk in self.iter_file(path):
            h.update(chunk)
        return h.hexdigest(), published is not None

    def read_bytes(self, path: str) -> bytes:
        return b"".join(self.iter_file(path))

    def size(self, path: str) -> int:
        return int(self._entry(path)["size"])

    def exists(self, path: str) -> bool:
        return check_relative(path, self.uri) in self._files()

    def list_files(self) -> list[str]:
        return sorted(self._files())

    def sha256(self, path: str) -> str:
        """The sha256 of the bytes as downloaded now (streamed, never held whole; checked where the Hub publishes
        a digest)."""
        return self.checked_sha256(path)[0]

    def recorded_sha256(self, path: str) -> str | None:
        """The sha256 the Hub publishes for an LFS file (None for files kept in git)."""
        return self._entry(path)["sha256"]

    def blob_id(self, path: str) -> str:
        return self._entry(path)["blob_id"]

    def copy_file_to(self, path: str, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.part")
        with open(tmp, "wb") as f:
            for chunk in self.iter_file(path):
                f.write(chunk)
        os.replace(tmp, dst)


def pin_upstream(uri: str, revision: str | None = None, upstream_id: str | None = None) -> tuple[str, str | None, str | None]:
    """``(uri, revision, id)`` for a conversion's upstream: an ``hf://`` URI is pinned to the commit its branch or
    tag names now (that commit becomes the revision, ORG/REPO the id, unless given); other URIs pass unchanged."""
    if not uri.startswith("hf://"):
        return uri, revision, upstream_id
    hub = HfStorage(uri)
    return hub.pinned_uri(), revision or hub.commit, upstream_id or hub.repo
