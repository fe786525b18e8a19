"""Stopping what we started: a child that leads its own process group (``start_new_session=True``) is stopped
with all its descendants, politely first."""

from __future__ import annotations

import os
import signal
import subprocess
import time

KILL_WAIT_S = 10.0  # after SIGKILL: only a process stuck in the kernel takes longer


def terminate_group(pid: int, grace: float = 10.0, process: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group led by ``pid``, wait up to ``grace`` seconds for it to exit, then SIGKILL it.

    ``process``: the leader's Popen when this process started it (waited on through it, so its returncode is
    set). Without it, the wait lasts until no process of the group is left, reaping the leader if it is our
    child. A group already gone is not an error.
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _exited(pid, grace, process):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _exited(pid, KILL_WAIT_S, process)


def _exited(pid: int, timeout: float, process: subprocess.Popen | None) -> bool:
    if process is not None:
        try:
            process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.waitpid(pid, os.WNOHANG)  # a zombie leader still counts as a member of its group
        except ChildProcessError:
            pass
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
