"""Where a release goes: ``hf://ORG/REPO[@BRANCH]`` on the Hub that ``HF_ENDPOINT`` names (default: huggingface.co)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from requant.errors import RequantError

DEFAULT_BRANCH = "main"
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ReleaseTarget:
    """A Hub model repository and the branch a release commits to (or opens a pull request against)."""

    repo_id: str
    branch: str = DEFAULT_BRANCH

    @property
    def uri(self) -> str:
        return f"hf://{self.repo_id}@{self.branch}"


def parse_target(uri: str) -> ReleaseTarget:
    """``hf://ORG/REPO`` or ``hf://ORG/REPO@BRANCH`` as a :class:`ReleaseTarget`; anything else is one line of error."""
    if not uri.startswith("hf://"):
        raise RequantError(f"{uri}: a release goes to the Hub: hf://ORG/REPO or hf://ORG/REPO@BRANCH")
    repo, sep, branch = uri[len("hf://"):].partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_PART.fullmatch(p) for p in parts) or ".." in repo:
        raise RequantError(f"{uri}: expected hf://ORG/REPO[@BRANCH] (letters, digits, '.', '_', '-')")
    if sep and not (branch and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", branch) and ".." not in branch):
        raise RequantError(f"{uri}: {branch!r} is not a branch name")
    return ReleaseTarget(repo, branch or DEFAULT_BRANCH)
