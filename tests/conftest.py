"""Shared fixtures: one synthetic upstream per session, Quark's reference exports computed once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from adversarial import adversarial_copy

from requant.testing.quark_reference import file2file_command, quark_equivalents
from requant.testing.synth import synthesize

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))


def pytest_configure(config):
    from artifacts import ensure_run_folder

    ensure_run_folder()


def pytest_terminal_summary(terminalreporter):
    from artifacts import ENV

    if os.environ.get(ENV) and any(Path(os.environ[ENV]).iterdir()):
        terminalreporter.write_line(f"test artifacts: {os.environ[ENV]}")


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("upstream") / "tiny", "tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def trained_upstream(tmp_path_factory) -> Path:
    """The INT4 upstream of the shipped trained model (requant/testing/trained/assets), as `requant synth --profile
    trained` writes it."""
    return synthesize(tmp_path_factory.mktemp("upstream") / "trained", "trained", seed=0, progress=False)


@pytest.fixture(scope="session")
def adversarial_upstream(tmp_path_factory, tiny_upstream) -> Path:
    """The tiny INT4 upstream with adversarial values in layer 1 (tests/adversarial.py)."""
    return adversarial_copy(tiny_upstream, tmp_path_factory.mktemp("adversarial") / "upstream")


@pytest.fixture(scope="session")
def adversarial_bf16_upstream(tmp_path_factory) -> Path:
    """The tiny checkpoint published as BF16, with adversarial values in layer 1, its routed experts included."""
    tiny = synthesize(tmp_path_factory.mktemp("upstream") / "tiny-bf16", "tiny", seed=0, progress=False, source="bf16")
    return adversarial_copy(tiny, tmp_path_factory.mktemp("adversarial-bf16") / "upstream")


@pytest.fixture(scope="session")
def quark_exports(tmp_path_factory, tiny_upstream) -> dict[str, Path]:
    """Quark 0.11.2's own file-to-file export of the tiny upstream, for every built-in recipe (given what its file
    states as its quark_equivalent), in one process."""
    root = tmp_path_factory.mktemp("quark")
    equivalents = quark_equivalents()
    jobs = [quark.job(str(root / name)) for name, quark in equivalents.items()]
    proc = subprocess.run(file2file_command(str(tiny_upstream), jobs), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: root / name for name in equivalents}


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The original GSM8K rows (MIT) kept beside the repository; REQUANT_GSM8K_DIR overrides."""
    from requant.evaluation.gsm8k import find_local_gsm8k

    path = find_local_gsm8k(__file__)
    if path is None:
        raise FileNotFoundError("no GSM8K copy found (shared/data/gsm8k beside the repository); set REQUANT_GSM8K_DIR")
    return path


HUB_TOKEN = "hf_requantTESTtoken0c9e5"  # the session's Hub token: scanned for after runs, so it must be the one used


@pytest.fixture(scope="session")
def local_hub(tmp_path_factory, tiny_upstream):
    """requant's local Hub (requant.testing.hubserver) for the session: ``testorg/tiny`` (public) and ``testorg/gated``
    (gated; HUB_TOKEN may read it) hold the tiny upstream. HF_ENDPOINT and HF_TOKEN point every client at it,
    including the Ray workers the flow tests start afterwards (their nodes inherit this environment)."""
    from types import SimpleNamespace

    from requant.testing.hubserver import publish_dir, serve_hub

    root = tmp_path_factory.mktemp("hub")
    commits = {repo: publish_dir(root, f"testorg/{repo}", tiny_upstream) for repo in ("tiny", "gated")}
    (root / "testorg/gated/repo.json").write_text(f'{{"gated": true, "tokens": ["{HUB_TOKEN}"]}}')
    with serve_hub(root) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("HF_TOKEN", HUB_TOKEN)
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield SimpleNamespace(server=server, url=server.url, root=root, commits=commits, token=HUB_TOKEN)
