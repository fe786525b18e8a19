"""The synthetic upstream has Kimi-K2.6's layout, checked with transformers and safetensors."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from transformers import DeepseekV3Config, PreTrainedTokenizerFast

from requant.io.storage import LocalDir
from requant.planning import build_plan
from requant.recipe import load_recipe
from requant.testing.synth import PROFILES, synthesize


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


def test_config_is_read_fully_by_the_kimi_k25_config_class_engines_use(tiny_upstream):
    """transformers' Kimi_K25Config is the class vLLM builds the model from: every vision key we write is one
    it reads (an ignored key leaves its default, e.g. a 27-block vision tower), the values match the tensors,
    the MLA sizes are ones engines' kernels take, and the EOS ids agree."""
    import dataclasses

    from transformers import Kimi_K25Config, Kimi_K25VisionConfig

    raw = json.loads((tiny_upstream / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(Kimi_K25VisionConfig)} | {"model_type"}
    assert set(raw["vision_config"]) <= known, set(raw["vision_config"]) - known
    cfg = Kimi_K25Config.from_pretrained(str(tiny_upstream))
    weight_map = json.loads((tiny_upstream / "model.safetensors.index.json").read_text())["weight_map"]
    blocks = {n.split(".")[3] for n in weight_map if n.startswith("vision_tower.encoder.blocks.")}
    assert cfg.vision_config.num_hidden_layers == len(blocks) == PROFILES["tiny"].vision_blocks
    assert cfg.vision_config.hidden_size == PROFILES["tiny"].vision_hidden == cfg.projection_hidden_size
    text = cfg.text_config
    assert (text.kv_lora_rank, text.qk_rope_head_dim, text.qk_nope_head_dim, text.v_head_dim) == (512, 64, 128, 128)
    generation = json.loads((tiny_upstream / "generation_config.json").read_text())
    assert raw["eos_token_id"] == raw["text_config"]["eos_token_id"] == generation["eos_token_id"]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_upstream / "tokenizer.json"))
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|media_pad|>")


def test_preprocessor_config_has_what_the_image_processor_reads(tiny_upstream):
    media = json.loads((tiny_upstream / "preprocessor_config.json").read_text())["media_proc_cfg"]
    raw = json.loads((tiny_upstream / "config.json").read_text())
    assert {"patch_size", "merge_kernel_size", "temporal_merge_kernel_size", "image_mean", "image_std",
            "in_patch_limit", "patch_limit_on_one_side", "fixed_output_tokens", "in_patch_limit_each_frame",
            "in_patch_limit_video"} <= set(media)
    assert media["patch_size"] == raw["vision_config"]["patch_size"]
    assert [media["merge_kernel_size"]] * 2 == raw["vision_config"]["merge_kernel_size"]


def test_synth_cli_offers_every_profile_and_source_format():
    from requant.cli.synth import PROFILE_NAMES, SOURCE_NAMES
    from requant.formats.source import SourceFormat

    assert sorted(PROFILE_NAMES) == sorted(PROFILES)
    assert list(SOURCE_NAMES) == [f.value for f in SourceFormat]


def test_deepseek_v3_profile_has_its_mtp_layer_in_fp8_blocks(tmp_path):
    """DeepSeek-V3's layout: text-only, FP8 with 128x128 block scales (partial edge blocks), one MTP layer whose head
    parts are BF16; transformers reads the config as its own DeepseekV3Config."""
    from safetensors import safe_open

    up = synthesize(tmp_path / "ds", "deepseek-v3", progress=False)
    config = json.loads((up / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["quantization_config"]["quant_method"] == "fp8"
    assert DeepseekV3Config(**config).num_hidden_layers == PROFILES["tiny"].layers
    dtypes = {}
    for shard in up.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            dtypes.update({k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()})
    mtp = f"model.layers.{PROFILES['tiny'].layers}"
    assert dtypes[f"{mtp}.eh_proj.weight"] == ("BF16", [128, 256])
    assert dtypes[f"{mtp}.mlp.experts.0.up_proj.weight"][0] == "F8_E4M3"
    assert dtypes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ("F32", [5, 1])  # 576 rows
    assert dtypes["model.layers.1.mlp.gate.weight"][0] == "BF16" and not any(k.startswith("language_model") for k in dtypes)
