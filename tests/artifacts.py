"""Where tests leave files for people to read (Prefect UI screenshots, vLLM's per-layer decisions, the hardening
ledger): one folder per test run, outside the repository, so concurrent runs never write into each other's.
TEST_ARTIFACTS_DIR names it (`make hardening` sets it, so its report step reads the ledger the run wrote);
otherwise tests/conftest.py makes a fresh one when the run starts and prints where at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ENV = "TEST_ARTIFACTS_DIR"  # not REQUANT_*: the flow forwards those to Ray workers


def ensure_run_folder() -> Path:
    """The run's folder, made (and put in the environment, for subprocesses) on first use."""
    if not os.environ.get(ENV):
        os.environ[ENV] = tempfile.mkdtemp(prefix="requant-test-artifacts-")
    return Path(os.environ[ENV])


def artifacts_dir(*parts: str) -> Path:
    path = ensure_run_folder().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
