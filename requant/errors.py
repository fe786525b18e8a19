"""Errors a user's input can trigger. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class RequantError(Exception):
    """Base class: anything the user can fix (bad input, bad arguments, incomplete output)."""


class CheckpointError(RequantError):
    """A checkpoint file is malformed; the message names the file and, where known, the tensor."""

    def __init__(self, file: str, message: str, tensor: str | None = None):
        self.file, self.tensor = file, tensor
        where = f"{file}: {tensor}" if tensor else file
        super().__init__(f"{where}: {message}")


class PlanError(RequantError):
    """Validation found problems before any conversion ran; ``problems`` lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems, first: {problems[0]}"
        super().__init__(head)


class VerifyError(RequantError):
    """An output checkpoint is incomplete or does not match its manifest."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems, first: {problems[0]}"
        super().__init__(head)
