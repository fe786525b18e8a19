"""The releases of a checkpoint, kept beside it: ``.requant/releases.json`` (run state, not part of the checkpoint and
never uploaded), one entry per release or refusal, newest last. The watcher's ledger and ``requant release``'s
output read it; the token is never part of it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from requant.manifest import RUN_STATE_DIR

RELEASES_FILE = f"{RUN_STATE_DIR}/releases.json"


@dataclass(frozen=True)
class ReleaseRecord:
    """One release: the repository, branch and commit it ended in (``url``: the commit's page; ``pull_request``: the
    PR's page with ``--create-pr``), the gate's verdict and the reason when forced; or a refusal (``refused``)."""

    repo: str
    branch: str
    verdict: str
    commit: str | None = None
    url: str | None = None
    pull_request: str | None = None
    forced: str | None = None
    changed: bool = True          # False: the branch already held exactly these files, no commit was made
    refused: str | None = None    # why nothing was released
    released_at: float = 0.0

    def describe(self) -> str:
        if self.refused:
            return f"not released: {self.refused}"
        where = self.pull_request or self.url
        return f"released {where}" if self.changed else f"already released at {where}"


def read_records(storage) -> list[ReleaseRecord]:
    if not storage.exists(RELEASES_FILE):
        return []
    fields = set(ReleaseRecord.__dataclass_fields__)
    return [ReleaseRecord(**{k: v for k, v in entry.items() if k in fields})
            for entry in json.loads(storage.read_bytes(RELEASES_FILE))]


def add_record(storage, record: ReleaseRecord) -> None:
    """Append ``record`` (stamped now) to the checkpoint's releases."""
    entries: list[dict[str, Any]] = [asdict(r) for r in read_records(storage)]
    entries.append(asdict(record) | {"released_at": record.released_at or time.time()})
    storage.put_bytes(RELEASES_FILE, (json.dumps(entries, indent=2) + "\n").encode())


def latest_record(storage) -> ReleaseRecord | None:
    records = read_records(storage)
    return records[-1] if records else None
