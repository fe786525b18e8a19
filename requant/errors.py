"""Errors a user's input can trigger. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class RequantError(Exception):
    """Base class: anything the user can fix (bad input, bad arguments, incomplete output)."""


def printable(text: str, limit: int = 200) -> str:
    """Names from untrusted files, made safe for a one-line message: control characters escaped, length capped."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


class CheckpointError(RequantError):
    """A checkpoint file is malformed; the message names the file and, where known, the tensor."""

    def __init__(self, file: str, message: str, tensor: str | None = None):
        self.file, self.tensor = file, tensor
        self.detail = message
        where = f"{printable(file)}: {printable(tensor)}" if tensor else printable(file)
        super().__init__(f"{where}: {printable(message, 400)}")

    def __reduce__(self):  # errors cross process boundaries (Ray tasks, Prefect results) intact
        return (type(self), (self.file, self.detail, self.tensor))


class ProblemsError(RequantError):
    """A check that reports every problem it found at once; ``problems`` lists them, the message names the first."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems, first: {problems[0]}"
        super().__init__(head)

    def __reduce__(self):
        return (type(self), (self.problems,))


class PlanError(ProblemsError):
    """Validation found problems before any conversion ran; ``problems`` lists them all."""


class VerifyError(ProblemsError):
    """An output checkpoint is incomplete or does not match its manifest."""


class SystemFailure(RequantError):
    """The operating system or the object store refused an operation (disk full, permission denied,
    read-only file system, credentials refused, ...): one line naming the path or URI and the cause."""


def os_failure(path: object, exc: OSError, doing: str = "") -> SystemFailure:
    """A one-line error for an OSError on ``path`` (``exc.filename`` wins when the OS named the file)."""
    import errno

    where = exc.filename if getattr(exc, "filename", None) else path
    code = errno.errorcode.get(exc.errno or 0, "")
    cause = exc.strerror or str(exc) or type(exc).__name__
    return SystemFailure(f"{printable(str(where), 300)}: {cause}{f' ({code})' if code else ''}"
                         f"{f' while {doing}' if doing else ''}")
