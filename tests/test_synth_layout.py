"""The synthetic upstream has Kimi-K2.6's layout, checked with transformers and safetensors."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from transformers import DeepseekV3Config, PreTrainedTokenizerFast

from requant.io.storage import LocalDir
from requant.plan import build_plan
from requant.recipe import load_recipe
from requant.synth import PROFILES, synthesize


def test_text_config_is_a_valid_deepseek_v3_config(tiny_upstream):
    raw = json.loads((tiny_upstream / "config.json").read_text())
    assert raw["architectures"] == ["KimiK25ForConditionalGeneration"] and raw["model_type"] == "kimi_k25"
    text = {k: v for k, v in raw["text_config"].items() if k != "quantization_config"}
    cfg = DeepseekV3Config(**text)
    assert (cfg.first_k_dense_replace, cfg.n_shared_experts, cfg.topk_method, cfg.scoring_func) == (1, 1, "noaux_tc", "sigmoid")
    assert raw["text_config"]["quantization_config"]["format"] == "pack-quantized"
    assert "vision_config" in raw


def test_layers_straddle_shards(tiny_upstream):
    weight_map = json.loads((tiny_upstream / "model.safetensors.index.json").read_text())["weight_map"]
    files_per_layer = defaultdict(set)
    for name, file in weight_map.items():
        if ".layers." in name:
            files_per_layer[int(name.split(".layers.")[1].split(".")[0])].add(file)
    assert len(set(weight_map.values())) == 4
    assert any(len(files) > 1 for files in files_per_layer.values())
    assert any(n.startswith("vision_tower.") for n in weight_map) and any(n.startswith("mm_projector.") for n in weight_map)


def test_tokenizer_loads_and_round_trips(tiny_upstream):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_upstream / "tokenizer.json"))
    text = "Question: Natalia sold 48 clips in April.\nAnswer: #### 72"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < PROFILES["tiny"].vocab


def test_same_seed_same_bytes(tmp_path):
    a = synthesize(tmp_path / "a", "tiny", seed=7, progress=False)
    b = synthesize(tmp_path / "b", "tiny", seed=7, progress=False)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.slow
def test_k26_topology_plans_61_layer_jobs(tmp_path):
    up = synthesize(tmp_path / "k26", "k26-topology", seed=0, progress=False)
    plan = build_plan(LocalDir(up), load_recipe("kimi-k2.6-mxfp4"))
    p = PROFILES["k26-topology"]
    assert (p.layers, p.experts, p.top_k) == (61, 384, 8)
    assert len(plan.jobs) == 62 and plan.jobs[0].name == "non-layer" and plan.jobs[-1].name == "layer-060"
    experts = [t for t in plan.jobs[5].tasks if ".experts." in t.name]
    assert len(experts) == 384 * 3 and all(t.kind == "int4" and t.target == "mxfp4" for t in experts)
