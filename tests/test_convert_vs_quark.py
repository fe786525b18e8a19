"""requant convert --local against AMD Quark 0.11.2's own file-to-file export of the same input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tensors import engine_fused_names, load_tensors, raw

import requant
from requant.cli import main
from requant.recipe import load_recipe
from requant.testing.quark_reference import quark_equivalents

RECIPES = list(quark_equivalents())  # every built-in Quark export, each with its Quark equivalent (conftest.py::quark_exports)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_upstream):
    root = tmp_path_factory.mktemp("requant")
    for recipe in RECIPES:
        requant.convert(str(tiny_upstream), str(root / recipe), recipe, progress=False)
    return root


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", RECIPES)
def test_tensors_equal_quark_export(recipe, converted, quark_exports):
    ours, theirs = load_tensors(converted / recipe), load_tensors(quark_exports[recipe])
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert raw(a) == raw(b), name


@pytest.fixture(scope="module")
def converted_exact(tmp_path_factory, tiny_upstream):
    """The same conversions with --no-fused-excludes, through the command line."""
    root = tmp_path_factory.mktemp("requant-exact")
    for recipe in RECIPES:
        assert main(["convert", str(tiny_upstream), str(root / recipe), "--recipe", recipe, "--local",
                     "--no-fused-excludes"]) == 0
    return root


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", RECIPES)
def test_config_equals_quark_export(recipe, converted, converted_exact, quark_exports):
    """With --no-fused-excludes config.json equals Quark's key for key; by default its exclude list also names the
    fused modules the engines build from excluded modules, and nothing else differs."""
    theirs = json.loads((quark_exports[recipe] / "config.json").read_text())
    quantizes = load_recipe(recipe).quantizes
    if not quantizes:
        # Quark always writes a config, here one that excludes everything; a recipe that quantizes nothing writes none.
        theirs.pop("quantization_config")
    exact = json.loads((converted_exact / recipe / "config.json").read_text())
    assert exact == theirs
    assert list(exact.get("quantization_config", {})) == list(theirs.get("quantization_config", {}))  # key order too
    assert "quantization_config" not in exact["text_config"]
    ours = json.loads((converted / recipe / "config.json").read_text())
    if not quantizes:
        assert ours == exact
        return
    exclude = ours["quantization_config"]["exclude"]
    added = engine_fused_names(theirs["quantization_config"]["exclude"])
    assert exclude == sorted(theirs["quantization_config"]["exclude"] + added)
    assert {**ours["quantization_config"], "exclude": None} == {**theirs["quantization_config"], "exclude": None}
    assert {**ours, "quantization_config": None} == {**theirs, "quantization_config": None}
    if "unquantized" in {load_recipe(recipe).target(c) for c in ("attention", "dense_mlp", "shared_expert")}:
        assert added  # a BF16 class whose modules the engines fuse


def test_router_difference_between_mxfp4_recipes(converted):
    seed = json.loads((converted / "kimi-k2.6-mxfp4" / "config.json").read_text())["quantization_config"]
    amd = json.loads((converted / "amd-kimi-mxfp4" / "config.json").read_text())["quantization_config"]
    router = "language_model.model.layers.1.mlp.gate"
    assert router in amd["exclude"] and router not in seed["exclude"]
    tensors = load_tensors(converted / "kimi-k2.6-mxfp4")
    assert tensors[f"{router}.weight"].dtype == torch.uint8 and f"{router}.weight_scale" in tensors
    assert tensors[f"{router}.e_score_correction_bias"].dtype == torch.float32


def test_copies_other_files_verbatim(converted, tiny_upstream):
    out = converted / "kimi-k2.6-mxfp4"
    for name in ("LICENSE", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "configuration_kimi_k25.py"):
        assert (out / name).read_bytes() == (tiny_upstream / name).read_bytes(), name
    assert (out / "UPSTREAM_README.md").read_bytes() == (tiny_upstream / "README.md").read_bytes()
    card = (out / "README.md").read_text()
    assert "kimi-k2.6-mxfp4" in card and "vLLM" in card


def test_local_conversion_is_deterministic(tmp_path, tiny_upstream, converted):
    requant.convert(str(tiny_upstream), str(tmp_path / "again"), "kimi-k2.6-mxfp4", progress=False)
    first = json.loads((converted / "kimi-k2.6-mxfp4" / "requant-manifest.json").read_text())["outputs"]
    second = json.loads((tmp_path / "again" / "requant-manifest.json").read_text())["outputs"]
    shards = [f for f in first if f.endswith(".safetensors")]
    assert shards and all(first[f] == second[f] for f in shards)


def test_manifest_provenance(converted, tiny_upstream):
    manifest = json.loads((converted / "fp8-reference" / "requant-manifest.json").read_text())
    upstream_names = set(json.loads((tiny_upstream / "model.safetensors.index.json").read_text())["weight_map"])
    assert set(manifest["sources"]) == upstream_names  # every upstream tensor accounted for
    assert set(manifest["inputs"]["shards"]) == {p.name for p in tiny_upstream.glob("*.safetensors")}
    assert manifest["versions"]["torch"].startswith("2.9.1")
    stats = manifest["stats"]
    assert len(stats) == 2 * 8 * 3 and all(s["snr_db"] > 25 for s in stats.values())


def test_module_split_across_shards_converts_the_same(tmp_path, tiny_upstream, converted):
    """A module whose weight_scale sits in another shard than its weight_packed (Quark's per-shard
    reader cannot do this; requant reads by tensor, so the output must not change)."""
    import shutil

    from safetensors.torch import save_file

    up = tmp_path / "split"
    shutil.copytree(tiny_upstream, up)
    index = json.loads((up / "model.safetensors.index.json").read_text())
    name = "language_model.model.layers.2.mlp.experts.3.down_proj.weight_scale"
    src = up / index["weight_map"][name]
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    moved = tensors.pop(name)
    save_file(tensors, str(src), metadata={"format": "pt"})
    save_file({name: moved}, str(up / "model-extra.safetensors"), metadata={"format": "pt"})
    index["weight_map"][name] = "model-extra.safetensors"
    (up / "model.safetensors.index.json").write_text(json.dumps(index))
    requant.convert(str(up), str(tmp_path / "out"), "kimi-k2.6-mxfp4", progress=False)
    ours, reference = load_tensors(tmp_path / "out"), load_tensors(converted / "kimi-k2.6-mxfp4")
    assert sorted(ours) == sorted(reference)
    assert all(raw(ours[k]) == raw(reference[k]) for k in ours)
