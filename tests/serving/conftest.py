"""Serving fixtures: the tiny upstream converted to the variants we serve, and one running reference server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import requant
from requant.engines.engines import launch, load_engines

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("kimi-k2.6-mxfp4", "fp8-reference", "bf16-staging")


@pytest.fixture(scope="session")
def tiny_variants(tmp_path_factory, tiny_upstream) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    out = {"upstream": tiny_upstream}
    for recipe in VARIANTS:
        requant.convert(str(tiny_upstream), str(root / recipe), recipe, progress=False)
        out[recipe] = root / recipe
    return out


def _serve(path: Path, name: str, tmp_path_factory):
    """`requant serve` on one variant, a real subprocess on a free loopback port."""
    engine = launch(load_engines()["reference"], str(path), served_model_name=name,
                    log_dir=tmp_path_factory.mktemp("serve-logs"), max_model_len=2048)
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def mxfp4_server(tiny_variants, tmp_path_factory):
    yield from _serve(tiny_variants["kimi-k2.6-mxfp4"], "tiny-mxfp4", tmp_path_factory)


@pytest.fixture(scope="session")
def fp8_server(tiny_variants, tmp_path_factory):
    yield from _serve(tiny_variants["fp8-reference"], "tiny-fp8", tmp_path_factory)
