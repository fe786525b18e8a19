"""Which upstream revision is newest, which ones were converted, and what a watcher should do next.

Upstream revisions: a Hugging Face repo (``hf://org/repo``: the commit its branch points to), or a
mirror in object storage or a directory laid out like the Hugging Face cache: ``refs/<branch>`` holds
the revision id and ``snapshots/<revision>/`` the checkpoint of that revision.

The ledger lives in the artifact store, one object per conversion attempt
(``<ledger>/<revision>/attempt-<k>.json``). A watcher claims attempt k with a conditional write
(S3 ``If-None-Match: *``; ``O_EXCL`` on a directory), so of any number of concurrent watchers exactly one
starts attempt k; the winner then records the flow run it started (``attempt-<k>.run.json``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import time
from dataclasses import dataclass

from requant.errors import CheckpointError, RequantError
from requant.formats.source import detect_source
from requant.io.storage import open_storage
from requant.layout import load_config
from requant.manifest import CONFIG_FILE

REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Prefect state types: a run in one of these may still finish; the others are final.
ACTIVE_STATES = {"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"}
FAILED_STATES = {"FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class UpstreamRevision:
    revision: str
    snapshot: str          # what requantize reads for this revision


def latest_revision(upstream: str, ref: str = "main") -> UpstreamRevision:
    if upstream.startswith("hf://"):
        from requant.io.hf import resolve_revision

        repo = upstream[len("hf://"):].split("@", 1)[0]
        sha = resolve_revision(repo, ref)
        return UpstreamRevision(sha, f"hf://{repo}@{sha}")
    storage = open_storage(upstream)
    marker = f"refs/{ref}"
    if not storage.exists(marker):
        raise RequantError(f"{upstream}: no {marker}; a mirror keeps snapshots/<revision>/ and refs/<branch> "
                           "(the Hugging Face cache layout)")
    revision = storage.read_bytes(marker).decode("utf-8", "replace").strip()
    if not REVISION_RE.match(revision):
        raise RequantError(f"{upstream}/{marker}: {revision[:100]!r} is not a revision id")
    return UpstreamRevision(revision, f"{upstream.rstrip('/')}/snapshots/{revision}")


# Documentation, by explicit name (fnmatch patterns over the lower-cased path; ``*`` crosses folders): the only
# files the fingerprint leaves out. Never a bare ``*.txt``: merges.txt and vocab.txt are tokenizer files.
DOCUMENTATION = (
    "readme.md", "*/readme.md",                           # the model card (the output keeps it as UPSTREAM_README.md)
    "docs/*.md",                                          # guides beside the model
    "*.png", "*.jpg", "*.jpeg", "*.gif", "*.svg", "*.webp",  # the card's figures
    "*.pdf",                                              # papers, reports
    ".gitattributes",                                     # git's LFS rules, not a model file
)


def is_documentation(name: str) -> bool:
    """Whether ``name`` (a path in a snapshot) is documentation that the fingerprint ignores."""
    return any(fnmatch.fnmatchcase(name.lower(), pattern) for pattern in DOCUMENTATION)


def content_fingerprint(snapshot: str) -> str | None:
    """A digest of what a conversion of ``snapshot`` writes, so that a revision with the same fingerprint as a
    converted one can reuse that output. The plan copies every file but the shards, the index and config.json into
    the output (requant.planning, ``extra_files``), so every file counts (tokenizer files, chat templates, remote code,
    LICENSE) except the documentation in :data:`DOCUMENTATION`: a revision that changes only those is recorded
    "weights unchanged" and its users get the earlier output, whose copies of those files are stale text that no
    loader, tokenizer or engine reads. LICENSE is not documentation: the output redistributes the weights under the
    licence it carries, so a new licence is converted into an output that carries it.

    Weight files count by the sha256 their store publishes, JSON files by their parsed content (key order and
    whitespace do not count), Python files by their syntax tree (a comment or a reflowed line changes neither),
    every other file by its bytes. None when a weight file's published digest is unknown (a plain directory): such
    upstreams are always converted."""
    import ast

    try:
        storage, parts = open_storage(snapshot), []
    except CheckpointError:  # a mirror's snapshot folder that is not there (yet): nothing to compare
        return None
    for name in storage.list_files():
        if is_documentation(name):
            continue
        if name.endswith((".safetensors", ".bin")):
            digest = storage.recorded_sha256(name)
            if digest is None:
                return None
            parts.append(f"{name}\0{digest}")
            continue
        data = storage.read_bytes(name)
        try:
            if name.endswith(".json"):
                data = json.dumps(json.loads(data), sort_keys=True).encode()
            elif name.endswith(".py"):
                data = ast.dump(ast.parse(data)).encode()  # parsed, never run
        except (ValueError, SyntaxError):
            pass  # not what its name says: its bytes count
        parts.append(f"{name}\0{hashlib.sha256(data).hexdigest()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def declared_source(snapshot: str) -> str:
    """The source format ``snapshot``'s config.json declares (``int4``, ``fp8-block``, ``mxfp4``, ``bf16``), or why
    requant cannot read it (the conversion would refuse it with the same line)."""
    where = f"{snapshot.rstrip('/')}/{CONFIG_FILE}"
    try:
        storage = open_storage(snapshot)
        return detect_source(load_config(storage.read_bytes(CONFIG_FILE), where).quantization, where).format.value
    except (CheckpointError, OSError) as e:
        return f"unreadable ({str(e)[:200]})"


def source_change(before: str | None, after: str) -> str | None:
    """What a watcher says of a revision whose source format differs from the last one it saw."""
    return f"source format {before} -> {after}" if before is not None and before != after else None


@dataclass(frozen=True)
class Attempt:
    revision: str
    number: int
    claimed_at: float
    watcher: str
    flow_run_id: str | None = None
    output: str | None = None


class Ledger:
    """Conversion attempts per revision, in object storage or a directory."""

    def __init__(self, uri: str):
        self.uri = uri
        self.storage = open_storage(uri, create=True)
        if hasattr(self.storage, "ensure_bucket"):
            self.storage.ensure_bucket()

    def attempts(self, revision: str) -> list[Attempt]:
        prefix = f"{revision}/attempt-"
        found = []
        for name in self.storage.list_files():
            m = re.fullmatch(re.escape(prefix) + r"(\d+)\.json", name)
            if not m:
                continue
            claim = json.loads(self.storage.read_bytes(name))
            run_name = f"{prefix}{m.group(1)}.run.json"
            run = json.loads(self.storage.read_bytes(run_name)) if self.storage.exists(run_name) else {}
            found.append(Attempt(revision, int(m.group(1)), claim["claimed_at"], claim["watcher"],
                                 run.get("flow_run_id"), run.get("output")))
        return sorted(found, key=lambda a: a.number)

    def revisions(self) -> list[str]:
        return sorted({name.split("/", 1)[0] for name in self.storage.list_files()
                       if "/attempt-" in name or name.endswith("/unchanged.json")})

    def claim(self, revision: str, number: int, watcher: str, fingerprint: str | None = None,
              source: str | None = None) -> bool:
        body = json.dumps({"revision": revision, "attempt": number, "watcher": watcher, "claimed_at": time.time(),
                           "fingerprint": fingerprint, "source": source})
        return self.storage.put_bytes(f"{revision}/attempt-{number}.json", body.encode(), if_none_match=True)

    def fingerprint(self, revision: str) -> str | None:
        """The content fingerprint recorded with the revision's first attempt (None when there is none)."""
        name = f"{revision}/attempt-1.json"
        return json.loads(self.storage.read_bytes(name)).get("fingerprint") if self.storage.exists(name) else None

    def source(self, revision: str) -> str | None:
        """The source format recorded with the revision's first attempt (None when there is none)."""
        name = f"{revision}/attempt-1.json"
        return json.loads(self.storage.read_bytes(name)).get("source") if self.storage.exists(name) else None

    def last_source(self, before: str) -> str | None:
        """The source format of the revision whose first attempt was claimed last, other than ``before``."""
        claimed = []
        for revision in self.revisions():
            name = f"{revision}/attempt-1.json"
            if revision != before and self.storage.exists(name):
                first = json.loads(self.storage.read_bytes(name))
                claimed.append((first["claimed_at"], first.get("source")))
        return max(claimed)[1] if claimed else None

    def mark_unchanged(self, revision: str, same_as: str, output: str | None) -> None:
        """Record that ``revision`` converts to what ``same_as`` already did (written once; the first one stays)."""
        body = json.dumps({"revision": revision, "same_as": same_as, "output": output, "recorded_at": time.time()})
        self.storage.put_bytes(f"{revision}/unchanged.json", body.encode(), if_none_match=True)

    def unchanged(self, revision: str) -> dict | None:
        name = f"{revision}/unchanged.json"
        return json.loads(self.storage.read_bytes(name)) if self.storage.exists(name) else None

    def record_run(self, revision: str, number: int, flow_run_id: str, output: str) -> None:
        body = json.dumps({"flow_run_id": flow_run_id, "output": output, "recorded_at": time.time()})
        self.storage.put_bytes(f"{revision}/attempt-{number}.run.json", body.encode())


@dataclass(frozen=True)
class Decision:
    action: str            # "submit" | "wait" | "done" | "give-up" | "unchanged"
    attempt: int           # the attempt to submit (submit) or the latest one
    reason: str


def decide(attempts: list[Attempt], states: dict[str, str], max_attempts: int, now: float,
           claim_timeout_s: float = 600.0) -> Decision:
    """What to do about one revision, given its attempts and the Prefect state type of each recorded run."""
    if not attempts:
        return Decision("submit", 1, "new revision")
    last = attempts[-1]
    if last.flow_run_id is None:
        if now - last.claimed_at < claim_timeout_s:
            return Decision("wait", last.number, "attempt claimed, run not recorded yet")
        state = "CRASHED"                        # the claiming watcher died before starting a run
    else:
        state = states.get(last.flow_run_id, "MISSING")
    if state == "COMPLETED":
        return Decision("done", last.number, f"converted by attempt {last.number}")
    if state in ACTIVE_STATES:
        return Decision("wait", last.number, f"attempt {last.number} is {state.lower()}")
    if last.number >= max_attempts:
        return Decision("give-up", last.number, f"{last.number} attempts failed (last: {state.lower()}); not retrying")
    return Decision("submit", last.number + 1, f"attempt {last.number} ended {state.lower()}; retrying")
