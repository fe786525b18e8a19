"""Wires the hardening ledger into pytest; see hardening_support.py."""

from __future__ import annotations

import signal

import pytest
from hardening_support import Ledger, unmount_all, write_report


def pytest_configure(config):
    """SIGTERM (a CI timeout, a killed run) becomes KeyboardInterrupt, so finally blocks unmount their tmpfs and
    pytest still reaches pytest_sessionfinish."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return Ledger()


def pytest_sessionfinish(session, exitstatus):
    unmount_all()
    write_report()
