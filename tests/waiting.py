"""Polling helper shared by tests that wait on other processes (a module of its own: several conftest.py exist)."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, else an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
