"""State shared by the flow tests and their conftest (a uniquely named module: several conftest.py exist)."""

from __future__ import annotations

RESTARTED: list = []  # SeaweedFS servers a test restarted in place (new PIDs), stopped at session end
