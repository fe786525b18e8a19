"""The compressed-tensors targets: ``requant convert`` against llm-compressor 0.14's own ``model_free_ptq`` of the
same input (``requant.testing.llmc_reference``, in its pinned virtualenv .venv-llmc; ``make test`` builds it), for
every built-in compressed-tensors recipe, on the tiny INT4 checkpoint, on an adversarial one, and on a BF16 one
whose routed experts are adversarial too (values that round to a signed zero, zero and subnormal blocks).

NVFP4 twice: with ``--no-shared-global-scale`` against llm-compressor as it is; by default (one global scale per
expert's gate_proj + up_proj, what vLLM reads) against llm-compressor with those pairs added to its own fused-set
tables, since it has no option for them.

Where the outputs differ on purpose (docs/recipes.md says the same to users): llm-compressor keeps the upstream's
INT4 ``quantization_config`` nested in ``text_config``; requant drops it, as it does for Quark.
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
from requant.formats.mxfp4 import unpack_fp4
from requant.formats.table import COMPRESSED_TENSORS_TABLE, FORMAT_TABLES
from requant.recipe import builtin_names, load_checks, load_recipe

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
RECIPES = [name for name in builtin_names() if load_recipe(name).export == ExportFormat.COMPRESSED_TENSORS]
# (recipe, shared_global_scale) for each recipe; a format with a global scale (NVFP4) also with llm-compressor's own
VARIANTS = {**{name: (name, True) for name in RECIPES},
            **{f"{name}-unshared": (name, False) for name in RECIPES
               if FORMAT_TABLES[COMPRESSED_TENSORS_TABLE][load_recipe(name).format].global_scale_name}}
UPSTREAMS = ("tiny_upstream", "adversarial_upstream", "adversarial_bf16_upstream")


def _llmcompressor(upstream: Path, root: Path) -> dict[str, Path]:
    if not LLMC_PYTHON.exists():
        pytest.fail(f"{LLMC_PYTHON} is missing: `make llmc-venv` builds it (make test does)")
    jobs = []
    for variant, (name, shared) in VARIANTS.items():
        equivalent = load_checks(name).llmcompressor
        assert equivalent is not None, f"recipe {name} states no llmcompressor_equivalent"
        jobs.append({"dst": str(root / "llmc" / variant), "scheme": equivalent.scheme,
                     "ignore": list(equivalent.ignore), "fuse_experts": shared})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([str(LLMC_PYTHON), "-m", "requant.testing.llmc_reference", str(upstream), str(root / "jobs.json")],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {variant: root / "llmc" / variant for variant in VARIANTS}


@pytest.fixture(scope="module", params=UPSTREAMS)
def pair(request, tmp_path_factory) -> tuple[str, Path, dict[str, Path], dict[str, Path]]:
    """(upstream fixture, upstream, requant's outputs, llm-compressor's outputs) for every compressed-tensors recipe."""
    upstream = request.getfixturevalue(request.param)
    root = tmp_path_factory.mktemp(f"ct-{request.param}")
    ours = {}
    for variant, (name, shared) in VARIANTS.items():
        requant.convert(str(upstream), str(root / "requant" / variant), name, progress=False,
                        shared_global_scale=shared)
        ours[variant] = root / "requant" / variant
    return request.param, upstream, ours, _llmcompressor(upstream, root)


def test_builtins_include_compressed_tensors():
    assert {"ct-mxfp4", "ct-nvfp4a16", "ct-nvfp4a16-unshared"} <= set(VARIANTS)


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", VARIANTS)
def test_tensors_equal_llmcompressor(recipe, pair):
    upstream_name, _, ours, theirs = pair
    a = assert_same_tensors(ours[recipe], theirs[recipe])
    if upstream_name == "adversarial_bf16_upstream":  # the signed zeros are exercised, not only possible
        packed = [t for n, t in a.items() if n.endswith(".weight_packed") and ".layers.1." in n]
        assert packed and any(bool((unpack_fp4(p) == 0x8).any()) for p in packed)


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", VARIANTS)
def test_config_equals_llmcompressor(recipe, pair):
    """config.json key for key, the upstream's nested quantization_config aside (llm-compressor leaves it, requant
    drops it); the index names the same tensors."""
    _, upstream, ours, theirs = pair
    a, b = (json.loads((d[recipe] / "config.json").read_text()) for d in (ours, theirs))
    upstream_config = json.loads((upstream / "config.json").read_text())
    nested = upstream_config.get("text_config", {}).get("quantization_config")
    assert b["text_config"].pop("quantization_config", None) == nested
    assert "quantization_config" not in a["text_config"]
    assert a == b
    assert list(a["quantization_config"]) == sorted(b["quantization_config"])  # llm-compressor dumps sorted keys
    weight_maps = [json.loads((d[recipe] / "model.safetensors.index.json").read_text())["weight_map"]
                   for d in (ours, theirs)]
    assert sorted(weight_maps[0]) == sorted(weight_maps[1])


@pytest.mark.oracle
def test_mxfp4_edges_against_compressed_tensors(tmp_path):
    """One BF16 matrix through llm-compressor and through requant's encoder: a quotient that underflows BF16 keeps
    +0 and one that does not keeps its sign, as compressed-tensors writes them; a block whose maximum rounds past
    2**128 is the one deliberate difference (compressed-tensors writes E8M0 byte 127 and zero codes, requant 254)."""
    import torch
    from safetensors.torch import load_file, save_file

    from requant.formats.mxfp4 import quantize_mxfp4_ct

    w = torch.zeros(2, 64)
    w[0, :4] = torch.tensor([2.0 ** 100, -2.0 ** -40, -2.0 ** -30, -2.0 ** 96])  # quotients -2**-138 and -2**-128
    w[0, 32:] = torch.linspace(-3, 3, 32)
    w[1, 0], w[1, 1] = 3.0e38, -1.0
    (tmp_path / "src").mkdir()
    save_file({"m.weight": w.to(torch.bfloat16)}, str(tmp_path / "src" / "model.safetensors"))
    (tmp_path / "src" / "config.json").write_text(json.dumps({"architectures": ["X"], "model_type": "x"}))
    (tmp_path / "jobs.json").write_text(json.dumps([{"dst": str(tmp_path / "dst"), "scheme": "MXFP4A16", "ignore": []}]))
    proc = subprocess.run([str(LLMC_PYTHON), "-m", "requant.testing.llmc_reference", str(tmp_path / "src"),
                           str(tmp_path / "jobs.json")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    theirs = load_file(str(tmp_path / "dst" / "model.safetensors"))
    packed, scale = quantize_mxfp4_ct(w.to(torch.bfloat16))
    assert torch.equal(packed[0], theirs["m.weight_packed"][0]) and torch.equal(scale[0], theirs["m.weight_scale"][0])
    assert unpack_fp4(packed[0])[1:3].tolist() == [0x0, 0x8]
    assert scale[1].tolist() == [254, 0] and theirs["m.weight_scale"][1].tolist() == [127, 0]


def test_nvfp4_shares_a_global_scale_where_the_engines_fuse(pair):
    """By default each expert's gate_proj and up_proj carry one global scale (what vLLM's fused w13 reads for both);
    with --no-shared-global-scale they differ, as llm-compressor writes them (on the tiny checkpoint most do)."""
    _, _, ours, _ = pair
    for variant, shared in (("ct-nvfp4a16", True), ("ct-nvfp4a16-unshared", False)):
        tensors = load_tensors(ours[variant])
        experts = sorted({n.rsplit(".", 2)[0] for n in tensors if ".mlp.experts." in n and n.endswith("global_scale")})
        equal = [bool(tensors[f"{e}.gate_proj.weight_global_scale"] == tensors[f"{e}.up_proj.weight_global_scale"])
                 for e in experts]
        assert experts and (all(equal) if shared else not all(equal)), variant


def test_the_vllm_view_decodes_up_proj_with_its_gates_scale(tiny_upstream, tmp_path):
    """requant.testing.vllm_reads (what dev/measure_global_scales.py serves): with separate scales, every expert's
    up_proj carries its gate's global scale, as vLLM's fused w13 applies it; every other byte is the checkpoint's.
    With shared scales the view is the checkpoint itself."""
    from requant.testing.vllm_reads import as_vllm_reads

    for shared in (False, True):
        out = tmp_path / f"shared-{shared}"
        requant.convert(str(tiny_upstream), str(out), "ct-nvfp4a16", progress=False, shared_global_scale=shared)
        before = load_tensors(out)
        after = load_tensors(as_vllm_reads(out, tmp_path / f"view-{shared}"))
        changed = sorted(n for n in before if raw(before[n]) != raw(after[n]))
        ups = [n for n in before if n.endswith("up_proj.weight_global_scale") and ".mlp.experts." in n]
        assert ups and all(raw(after[n]) == raw(before[n.replace("up_proj", "gate_proj")]) for n in ups)
        assert (changed == []) if shared else (changed and set(changed) <= set(ups))
        assert not (tmp_path / f"view-{shared}" / "requant-manifest.json").exists()


@pytest.mark.oracle
def test_an_nvfp4_upstream_decodes_as_compressed_tensors_decodes_it(tmp_path):
    """An NVFP4 upstream (synth kimi-nvfp4, made adversarial): bf16-staging equals compressed-tensors 0.20's own BF16
    decode (tests/ct_decode.py in .venv-quark13) tensor for tensor, and the reference server's FP32 weights round to
    it; ct-nvfp4a16 from it quantizes that decode as from any BF16 weights."""
    import torch

    from requant.serving.checkpoint import load_checkpoint
    from requant.testing.synth import synthesize

    q13 = ROOT / ".venv-quark13" / "bin" / "python"
    upstream = synthesize(tmp_path / "upstream", "kimi-nvfp4", progress=False)
    adversarial_nvfp4(upstream)
    proc = subprocess.run([str(q13), str(ROOT / "tests" / "ct_decode.py"), str(upstream), str(tmp_path / "ct-bf16")],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    requant.convert(str(upstream), str(tmp_path / "staged"), "bf16-staging", progress=False)
    ours, theirs = load_tensors(tmp_path / "staged"), load_tensors(tmp_path / "ct-bf16")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert raw(ours[name]) == raw(theirs[name]), name
    loaded = load_checkpoint(str(upstream))
    assert set(loaded.schemes.values()) == {"bf16", "nvfp4"}
    for name, weight in loaded.weights.items():
        decoded = theirs[f"language_model.{name}"]
        assert torch.equal(weight.to(decoded.dtype), decoded), name
