"""Wires the hardening ledger into pytest; see hardening_support.py."""

from __future__ import annotations

import pytest
from hardening_support import Ledger, write_report


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return Ledger()


def pytest_sessionfinish(session, exitstatus):
    write_report()
