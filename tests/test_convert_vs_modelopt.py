"""The Model Optimizer target: ``requant convert`` against NVIDIA Model Optimizer 0.47's own quantization and export of
the same weights (``requant.testing.modelopt_reference``, in the peers' pinned virtualenv .venv-llmc; ``make test``
builds it), for every built-in ``modelopt`` recipe, on the tiny INT4 checkpoint, on an adversarial one, on a BF16
one whose routed experts are adversarial too (values that round to a signed zero, zero and subnormal blocks), and on
an adversarial Model Optimizer NVFP4 (W4A4) release, which requant also reads as an upstream: decoded as Model
Optimizer's own ``NVFP4QTensor`` decodes it.

Where the outputs differ on purpose (docs/recipes.md says the same to users): a set of modules sharing one
``weight_scale_2`` that is zero throughout, which Model Optimizer writes as NaN scales and code 7 (6.0), requant as
zeros with ``weight_scale_2`` 1 (``test_zero_weights_are_the_one_deliberate_difference``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from adversarial import adversarial_nvfp4
from tensors import assert_same_tensors, load_tensors, raw

import requant
from requant.export import ExportFormat
from requant.export.modelopt import exclude_modules
from requant.formats.mxfp4 import unpack_fp4
from requant.manifest import HF_QUANT_CONFIG
from requant.recipe import builtin_names, load_checks, load_recipe

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
RECIPES = [name for name in builtin_names() if load_recipe(name).export == ExportFormat.MODELOPT]
UPSTREAMS = ("tiny_upstream", "adversarial_upstream", "adversarial_bf16_upstream", "modelopt_nvfp4_upstream")


@pytest.fixture(scope="module")
def modelopt_nvfp4_upstream(tmp_path_factory) -> Path:
    """synth kimi-nvfp4-modelopt (NVIDIA's NVFP4 layout, activation scales included), made adversarial."""
    from requant.testing.synth import synthesize

    upstream = synthesize(tmp_path_factory.mktemp("modelopt-upstream") / "upstream", "kimi-nvfp4-modelopt",
                          progress=False)
    adversarial_nvfp4(upstream)
    return upstream


def _peers_python() -> str:
    if not PEERS_PYTHON.exists():
        pytest.fail(f"{PEERS_PYTHON} is missing: `make llmc-venv` builds it (make test does)")
    return str(PEERS_PYTHON)


def _equivalent_jobs(src: Path, dst: Path) -> list[dict]:
    """The oracle's jobs for one upstream: the weights Model Optimizer starts from ("decoded"), and every recipe."""
    jobs = [{"src": str(src), "dst": str(dst / "decoded")}]
    for name in RECIPES:
        equivalent = load_checks(name).modelopt
        assert equivalent is not None, f"recipe {name} states no modelopt_equivalent"
        jobs.append({"src": str(src), "dst": str(dst / name), "scheme": equivalent.scheme,
                     "enable": list(equivalent.enable)})
    return jobs


E = "model.layers.1.mlp.experts"


def _zero_weights() -> dict:
    """An all-zero expert pair, a pair with one zero member, signed zeros beside a large value, a group whose scale
    is below E4M3's smallest (clamped to 2**-9)."""
    import torch

    w = {f"{E}.0.gate_proj": torch.zeros(2, 32), f"{E}.0.up_proj": torch.zeros(2, 32),
         f"{E}.1.gate_proj": torch.zeros(2, 32), f"{E}.1.up_proj": torch.linspace(-3, 3, 64).reshape(2, 32)}
    w[f"{E}.1.up_proj"][0, :4] = torch.tensor([3000.0, -1e-3, -1e-30, 1e-4])
    w[f"{E}.1.up_proj"][1, 16:] = 1e-3
    return {k: v.to(torch.bfloat16) for k, v in w.items()}


def _summary_cases() -> list[dict]:
    """Name sets built to hit each case of the exclude summary: a prefix no quantized module shares (``p*``), one
    that only a longer sibling shares (``p.*``), a module whose parent is quantized, names that prefix others."""
    import random

    rng = random.Random(5)
    cases = []
    for _ in range(40):
        names = sorted({".".join(rng.choice(("a", "b", "ab", "a1", "mlp", "gate", "gate_proj", "0", "1", "10"))
                                 for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 14))})
        quantized = [n for n in names if rng.random() < 0.4]
        cases.append({"quantized": quantized, "unquantized": [n for n in names if n not in quantized]})
    return cases


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict:
    """Every upstream converted by requant (each modelopt recipe, and bf16-staging) and, in one Model Optimizer
    process (it takes seconds to import), by Model Optimizer: ``{fixture: (upstream, ours, theirs)}``; and its
    output for the zero-weights matrix ("zero") and its exclude summaries of the name sets ("summary")."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("modelopt")
    jobs, out = [], {}
    for fixture in UPSTREAMS:
        upstream = request.getfixturevalue(fixture)
        ours = {}
        for name in [*RECIPES, "bf16-staging"]:
            requant.convert(str(upstream), str(root / fixture / "requant" / name), name, progress=False)
            ours[name] = root / fixture / "requant" / name
        jobs += _equivalent_jobs(upstream, root / fixture / "modelopt")
        out[fixture] = (upstream, ours, {j["dst"].rsplit("/", 1)[1]: Path(j["dst"]) for j in jobs[-1 - len(RECIPES):]})
    zero = root / "zero-src"
    zero.mkdir()
    save_file({f"{k}.weight": v for k, v in _zero_weights().items()}, str(zero / "model.safetensors"))
    (zero / "config.json").write_text(json.dumps({"architectures": ["X"], "model_type": "x"}))
    jobs.append({"src": str(zero), "dst": str(root / "zero"), "scheme": "W4A16_NVFP4",
                 "enable": ["*.experts.*weight_quantizer"]})
    (root / "cases.json").write_text(json.dumps(_summary_cases()))
    jobs.append({"dst": str(root / "summary.json"), "summarize": str(root / "cases.json")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([_peers_python(), "-m", "requant.testing.modelopt_reference", jobs[0]["src"],
                           str(root / "jobs.json")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**out, "zero": root / "zero", "summary": json.loads((root / "summary.json").read_text())}


@pytest.fixture(params=UPSTREAMS)
def pair(request, runs) -> tuple[str, Path, dict[str, Path], dict[str, Path]]:
    """(upstream fixture, upstream, requant's outputs, Model Optimizer's outputs) for every modelopt recipe, and
    bf16-staging beside Model Optimizer's starting weights ("decoded")."""
    return (request.param, *runs[request.param])


def test_builtins_include_modelopt():
    assert "modelopt-nvfp4" in RECIPES


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", RECIPES)
def test_tensors_equal_modelopt(recipe, pair):
    upstream_name, _, ours, theirs = pair
    a = assert_same_tensors(ours[recipe], theirs[recipe])
    packed = [t for n, t in a.items() if n.endswith("_proj.weight") and ".mlp.experts." in n]
    assert packed and all(t.dtype.itemsize == 1 for t in packed)
    if upstream_name == "adversarial_bf16_upstream":  # the signed zeros are exercised, not only possible
        layer1 = [t for n, t in a.items() if n.endswith("_proj.weight") and ".layers.1.mlp.experts." in n]
        assert any(bool((unpack_fp4(t) == 0x8).any()) for t in layer1)


@pytest.mark.oracle
def test_bf16_staging_and_the_reference_server_decode_as_modelopt_starts(pair):
    """requant's BF16 decode of each upstream (bf16-staging) equals the weights Model Optimizer is given (for a Model
    Optimizer NVFP4 upstream: its own decode, signed zeros as +0 and its activation scales dropped); the reference
    server's FP32 weights round to them."""
    import torch

    from requant.serving.checkpoint import load_checkpoint

    upstream_name, upstream, ours, theirs = pair
    a, b = load_tensors(ours["bf16-staging"]), load_tensors(theirs["decoded"])
    assert sorted(a) == sorted(b)
    for name in a:
        assert raw(a[name]) == raw(b[name]), name
    if upstream_name == "modelopt_nvfp4_upstream":
        loaded = load_checkpoint(str(upstream))
        assert set(loaded.schemes.values()) == {"bf16", "nvfp4-modelopt"}
        for name, weight in loaded.weights.items():
            decoded = b[f"language_model.{name}"]
            assert torch.equal(weight.to(decoded.dtype), decoded), name
        assert not (ours["bf16-staging"] / HF_QUANT_CONFIG).exists()  # the upstream's describes weights now gone


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", RECIPES)
def test_config_and_hf_quant_config_equal_modelopt(recipe, pair):
    """hf_quant_config.json byte for byte; config.json key for key (Model Optimizer's export writes it through
    transformers, requant with its own formatting); the index names the same tensors."""
    _, _, ours, theirs = pair
    assert (ours[recipe] / HF_QUANT_CONFIG).read_bytes() == (theirs[recipe] / HF_QUANT_CONFIG).read_bytes()
    a, b = (json.loads((d[recipe] / "config.json").read_text()) for d in (ours, theirs))
    assert a == b and a["quantization_config"]["quant_method"] == "modelopt"
    assert list(a["quantization_config"]) == list(b["quantization_config"])


@pytest.mark.oracle
def test_exclude_modules_summarize_as_modelopt_does(runs):
    """requant's exclude_modules against Model Optimizer's own summary (``_prefix_wildcard_summarize_exclude_modules``)
    on name sets built to hit each of its cases (``_summary_cases``)."""
    ours = [exclude_modules(c["unquantized"], c["quantized"]) for c in _summary_cases()]
    assert ours == runs["summary"]
    assert any(e.endswith(".*") for case in ours for e in case) and any(e.endswith("*") and not e.endswith(".*")
                                                                         for case in ours for e in case)


@pytest.mark.oracle
def test_zero_weights_are_the_one_deliberate_difference(runs):
    """One BF16 expert layer through Model Optimizer and through requant's encoder (``_zero_weights``): an all-zero
    gate_proj + up_proj pair gets NaN scales and code 7 from Model Optimizer, zeros with weight_scale_2 1 from
    requant; in a pair where only one is zero, the zero one shares its partner's weight_scale_2 and both equal Model
    Optimizer's; signed zeros and the smallest group scale (2**-9) agree."""
    import torch
    from safetensors.torch import load_file

    from requant.formats.nvfp4 import quantize_nvfp4_modelopt, tensor_amax

    w = _zero_weights()
    theirs = load_file(str(runs["zero"] / "model.safetensors"))
    for expert in (0, 1):
        pair = [w[f"{E}.{expert}.{p}_proj"] for p in ("gate", "up")]
        amax = torch.stack([tensor_amax(t) for t in pair]).amax()
        for proj, weight in zip(("gate", "up"), pair):
            packed, scale, scale_2 = quantize_nvfp4_modelopt(weight, amax)
            name = f"{E}.{expert}.{proj}_proj"
            got = (theirs[f"{name}.weight"], theirs[f"{name}.weight_scale"], theirs[f"{name}.weight_scale_2"])
            if expert == 0:  # zero throughout: Model Optimizer divides zero by zero
                assert torch.isnan(got[1].float()).all() and bool((unpack_fp4(got[0]) == 7).all())
                assert float(got[2]) == 0.0
                assert not packed.any() and bool((scale.float() == 1).all()) and float(scale_2) == 1.0
            else:
                assert [raw(t) for t in (packed, scale, scale_2)] == [raw(t) for t in got], name
    up = quantize_nvfp4_modelopt(w[f"{E}.1.up_proj"])
    assert unpack_fp4(up[0])[0, 1:3].tolist() == [0x8, 0x8] and float(up[1].float().min()) == 2.0 ** -9
