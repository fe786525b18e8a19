"""Bad upstream input: a one-line error naming file and tensor, exit status 2, no output left behind."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from requant.cli import main
from requant.testing.synth import PROFILES, synthesize

EXPERT = "language_model.model.layers.2.mlp.experts.5.up_proj"
ATTN = "language_model.model.layers.1.self_attn.q_a_proj.weight"


def _index(up: Path) -> dict:
    return json.loads((up / "model.safetensors.index.json").read_text())


def _shard_of(up: Path, tensor: str) -> Path:
    return up / _index(up)["weight_map"][tensor]


def _resave(up: Path, tensor: str, change) -> Path:
    """Rewrite the shard holding ``tensor`` with safetensors itself, after ``change(tensors)``."""
    shard = _shard_of(up, tensor)
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = _index(up)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index["weight_map"].update({k: shard.name for k in tensors})
    (up / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


def _rewrite_header(shard: Path, change) -> None:
    """Edit the JSON header in place, keeping the data bytes as they are."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def truncated(up):
    shard = _shard_of(up, ATTN)
    shard.write_bytes(shard.read_bytes()[:-100])
    return shard.name, None


def header_past_eof(up):
    shard = _shard_of(up, ATTN)
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    return shard.name, None


def offsets_out_of_bounds(up):
    shard = _shard_of(up, ATTN)

    def change(h):
        begin, end = h[ATTN]["data_offsets"]
        h[ATTN]["data_offsets"] = [begin + 10**9, end + 10**9]

    _rewrite_header(shard, change)
    return shard.name, ATTN


def overlapping_offsets(up):
    shard = _shard_of(up, ATTN)
    norm = ATTN.replace("q_a_proj", "q_a_layernorm")

    def change(h):
        begin, _ = h[ATTN]["data_offsets"]
        h[norm]["data_offsets"] = [begin, begin + (h[norm]["data_offsets"][1] - h[norm]["data_offsets"][0])]

    _rewrite_header(shard, change)
    return shard.name, None


def missing_file(up):
    index = _index(up)
    index["weight_map"][ATTN] = "model-00099-of-000004.safetensors"
    (up / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model-00099-of-000004.safetensors", None


def path_outside(up):
    (up.parent / "evil.safetensors").write_bytes((up / _index(up)["weight_map"][ATTN]).read_bytes())
    index = _index(up)
    index["weight_map"] = {k: ("../evil.safetensors" if v == index["weight_map"][ATTN] else v) for k, v in index["weight_map"].items()}
    (up / "model.safetensors.index.json").write_text(json.dumps(index))
    return "../evil.safetensors", None


def packed_without_scale(up):
    shard = _resave(up, f"{EXPERT}.weight_scale", lambda t: t.pop(f"{EXPERT}.weight_scale"))
    return shard.name, EXPERT


def shape_disagrees(up):
    shard = _resave(up, ATTN, lambda t: t.__setitem__(ATTN, torch.zeros(65, 128, dtype=torch.bfloat16)))
    return shard.name, ATTN


def weight_shape_value_wrong(up):
    name = f"{EXPERT}.weight_shape"
    shard = _resave(up, name, lambda t: t.__setitem__(name, torch.tensor([64, 256], dtype=torch.int32)))
    return shard.name, name


def unknown_architecture(up):
    config = json.loads((up / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (up / "config.json").write_text(json.dumps(config))
    return "config.json", None


def nan_in_weight(up):
    def change(t):
        t[ATTN] = t[ATTN].clone()
        t[ATTN][3, 7] = float("nan")

    return _resave(up, ATTN, change).name, ATTN


def inf_in_scale(up):
    name = f"{EXPERT}.weight_scale"

    def change(t):
        t[name] = t[name].clone()
        t[name][0, 0] = float("inf")

    return _resave(up, name, change).name, name


def bad_quantization(up):
    config = json.loads((up / "config.json").read_text())
    config["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128
    (up / "config.json").write_text(json.dumps(config))
    return "config.json", None


CASES = [truncated, header_past_eof, offsets_out_of_bounds, overlapping_offsets, missing_file, path_outside,
         packed_without_scale, shape_disagrees, weight_shape_value_wrong, unknown_architecture, nan_in_weight,
         inf_in_scale, bad_quantization]


@pytest.fixture
def upstream(tmp_path, tiny_upstream):
    dst = tmp_path / "up"
    shutil.copytree(tiny_upstream, dst)
    return dst


def _convert(up: Path, out: Path, capsys, recipe="kimi-k2.6-mxfp4"):
    rc = main(["convert", str(up), str(out), "--recipe", recipe, "--local"])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("corrupt", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_fails_cleanly(corrupt, upstream, tmp_path, capsys):
    file, tensor = corrupt(upstream)
    out = tmp_path / "out"
    rc, err = _convert(upstream, out, capsys)
    errors = [line for line in err if "error:" in line]
    assert rc == 2
    assert len(errors) == 1 and errors[0].startswith("requant convert: error: "), err
    assert file in errors[0], errors[0]
    if tensor:
        assert tensor in errors[0], errors[0]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))  # no staging left over either


def test_all_plan_problems_reported_together(upstream, tmp_path, capsys):
    shape_disagrees(upstream)
    packed_without_scale(upstream)
    rc, err = _convert(upstream, tmp_path / "out", capsys)
    assert rc == 2 and err[0].startswith("requant convert: error: 2 problems")
    assert any(ATTN in line for line in err) and any(EXPERT in line for line in err)


def test_input_dim_not_multiple_of_32(tmp_path, capsys):
    up = synthesize(tmp_path / "up48", dataclasses.replace(PROFILES["tiny"], hidden=48, layers=2), progress=False)
    rc, err = _convert(up, tmp_path / "out", capsys)
    assert rc == 2 and "input dimension 48 is not a multiple of 32" in "\n".join(err)
    assert not (tmp_path / "out").exists()


def test_existing_destination_is_not_overwritten(upstream, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    rc, err = _convert(upstream, out, capsys)
    assert rc == 2 and "already exists" in err[-1] and (out / "keep").exists()


def test_remote_code_is_never_executed(upstream, tmp_path, capsys):
    # the synthetic remote-code file raises if imported; conversion copies it without running it
    rc, _ = _convert(upstream, tmp_path / "out", capsys)
    assert rc == 0
    assert (tmp_path / "out" / "configuration_kimi_k25.py").read_bytes() == (upstream / "configuration_kimi_k25.py").read_bytes()
