"""requant verify: a finished checkpoint passes; missing, corrupt, extra or unpublished output fails."""

from __future__ import annotations

import json
import shutil

import pytest

import requant
from requant.cli import main
from requant.errors import VerifyError
from requant.evaluation.publish import publish_evaluation
from requant.manifest import manifest_digest, seal, sealed_as_stored
from requant.verification import verify


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_upstream):
    out = tmp_path_factory.mktemp("verify") / "mx"
    requant.convert(str(tiny_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
    return out


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _verify(path, capsys):
    rc = main(["verify", str(path)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_finished_output_verifies(good, capsys):
    rc, text = _verify(good, capsys)
    assert rc == 0 and "203 upstream tensors accounted for" in text


def test_flipped_byte_in_a_shard_is_caught(copy, capsys):
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1000] ^= 0x01
    shard.write_bytes(bytes(data))
    rc, text = _verify(copy, capsys)
    assert rc == 2 and shard.name in text and "sha256" in text


def test_missing_manifest_means_incomplete(copy, capsys):
    (copy / "requant-manifest.json").unlink()
    rc, text = _verify(copy, capsys)
    assert rc == 2 and "incomplete" in text


def test_missing_shard_and_extra_file(copy, capsys):
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    shard.unlink()
    (copy / "stray.safetensors").write_bytes(b"x")
    rc, text = _verify(copy, capsys)
    assert rc == 2 and shard.name in text and "stray.safetensors" in text


def test_config_edit_is_caught(copy, capsys):
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["exclude"].append("language_model.model.layers.1.mlp.experts.0.up_proj")
    (copy / "config.json").write_text(json.dumps(config))
    rc, text = _verify(copy, capsys)
    assert rc == 2 and "config.json" in text


def test_a_fused_name_excluded_over_quantized_shards_is_caught(copy, capsys):
    """An exclude entry that makes an engine build a fused module BF16 around MXFP4 shards, sealed as if requant
    had written it: only the config check can see it."""
    from requant.io.safetensors import sha256_file
    from requant.manifest import sealed_bytes

    path = copy / "config.json"
    config = json.loads(path.read_text())
    assert "language_model.model.layers.1.mlp.shared_experts.gate_up_proj" in config["quantization_config"]["exclude"]
    config["quantization_config"]["exclude"].append("language_model.model.layers.1.mlp.experts.0.gate_up_proj")
    path.write_text(json.dumps(config))
    manifest = json.loads((copy / "requant-manifest.json").read_text())
    manifest.pop("digest")
    manifest["outputs"]["config.json"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (copy / "requant-manifest.json").write_bytes(sealed_bytes(manifest))
    rc, text = _verify(copy, capsys)
    assert rc == 2 and "fused module language_model.model.layers.1.mlp.experts.0.gate_up_proj" in text
    assert "layers.1.mlp.experts.0.gate_proj is quantized" in text


def test_snr_bound_from_recipe(copy, capsys):
    manifest = json.loads((copy / "requant-manifest.json").read_text())
    manifest["recipe"]["min_snr_db"] = 99.0
    (copy / "requant-manifest.json").write_text(json.dumps(seal(manifest)))     # as if written that way
    rc, text = _verify(copy, capsys)
    assert rc == 2 and "below the recipe's 99.0 dB" in text


def test_manifest_edit_is_caught(copy, capsys):
    manifest = json.loads((copy / "requant-manifest.json").read_text())
    manifest["upstream"]["revision"] = "someone-elses"
    (copy / "requant-manifest.json").write_text(json.dumps(manifest))
    rc, text = _verify(copy, capsys)
    assert rc == 2 and "digest does not match" in text


def test_stored_manifest_is_its_canonical_json_and_any_byte_edit_breaks_the_seal(copy, capsys):
    """The manifest is stored as the canonical JSON its digest is taken over (verify hashes the bytes instead of
    encoding ~10^5 tensor entries again); each edit below keeps it valid JSON, so only the seal can catch it."""
    path = copy / "requant-manifest.json"
    raw = path.read_bytes()
    manifest = json.loads(raw)
    assert manifest["digest"] == manifest_digest(manifest)  # the definition, by encoding again
    assert sealed_as_stored(raw, manifest)
    size = manifest["outputs"]["config.json"]["size"]
    edits = [
        raw.replace(b'"size":%d' % size, b'"size":%d' % (size + 1), 1),  # a value
        raw.replace(b'"digest":"', b'"digest":"0', 1),  # the digest itself
        raw[:-2] + b' }\n',  # formatting only: not the stored form, so checked by encoding again (still sealed)
    ]
    for edited, sealed in zip(edits, (False, False, True)):
        assert sealed_as_stored(edited, json.loads(edited)) is sealed
    path.write_bytes(edits[0])
    rc, text = _verify(copy, capsys)
    assert rc == 2 and "digest does not match" in text
    path.write_text(json.dumps(manifest, indent=2))  # sealed, in another layout (written by an earlier requant)
    assert _verify(copy, capsys)[0] == 0


def test_flipped_byte_in_an_eval_report_is_caught(copy, tmp_path):
    """README: `requant verify` re-checks a published checkpoint including its eval/ reports."""
    report = tmp_path / "report"
    (report / "candidate").mkdir(parents=True)
    (report / "report.md").write_text("# GSM8K comparison\n\n| filter | candidate | reference |\n| strict-match | "
                                      "93.6 | 94.0 |\n\nVerdict: pass\n")
    (report / "candidate" / "gsm8k.json").write_text(json.dumps({"scores": {"strict-match": {"42": 0.936}}}) + "\n")
    uploaded = publish_evaluation(str(copy), report, summary={"verdict": "pass"})
    assert "eval/report.md" in uploaded
    verify(str(copy))                                    # the published evaluation verifies as it is
    target = copy / "eval" / "report.md"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01                         # same size: only the digest can tell
    target.write_bytes(bytes(data))
    with pytest.raises(VerifyError) as info:
        verify(str(copy))
    assert len(info.value.problems) == 1, info.value.problems
    assert "eval/report.md" in info.value.problems[0] and "sha256" in info.value.problems[0]


def test_mixed_formats_are_checked_per_class(tiny_upstream, tmp_path, capsys):
    """amd-kimi-k25-mxfp4-attn-fp8: each quantized module must have its class's format in the tensors, in the
    recipe the manifest records and in Quark's config (layer_quant_config first, then global), even when the
    manifest was rewritten to match (resealed, hashes updated)."""
    import hashlib

    out = tmp_path / "mixed"
    requant.convert(str(tiny_upstream), str(out), "amd-kimi-k25-mxfp4-attn-fp8", progress=False)
    assert _verify(out, capsys)[0] == 0

    def rewrite(config_edit=None, recipe_edit=None):
        dst = tmp_path / f"edit-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, dst)
        manifest = json.loads((dst / "requant-manifest.json").read_text())
        if config_edit:
            config = json.loads((dst / "config.json").read_text())
            config_edit(config["quantization_config"])
            data = json.dumps(config, indent=2).encode()
            (dst / "config.json").write_bytes(data)
            manifest["outputs"]["config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if recipe_edit:
            recipe_edit(manifest["recipe"])
        (dst / "requant-manifest.json").write_text(json.dumps(seal(manifest)))
        return _verify(dst, capsys)

    rc, text = rewrite(config_edit=lambda q: q["layer_quant_config"].clear())
    assert rc == 2 and "self_attn" in text and "is fp8_per_channel but the config declares it mxfp4 (global_quant_config)" in text
    rc, text = rewrite(recipe_edit=lambda r: r["targets"].update(attention="mxfp4"))
    assert rc == 2 and "quantized as fp8_per_channel but the recipe says mxfp4" in text


def test_compressed_tensors_config_is_checked(tiny_upstream, tmp_path, capsys):
    """ct-mxfp4: the ignore list must leave every quantized module quantized and name every unquantized Linear (a
    reader builds the rest quantized), and the group must declare the recipe's format, even resealed."""
    import hashlib

    out = tmp_path / "ct"
    requant.convert(str(tiny_upstream), str(out), "ct-mxfp4", progress=False)
    assert _verify(out, capsys)[0] == 0

    def rewrite(config_edit):
        dst = tmp_path / f"edit-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, dst)
        manifest = json.loads((dst / "requant-manifest.json").read_text())
        config = json.loads((dst / "config.json").read_text())
        config_edit(config["quantization_config"])
        data = json.dumps(config, indent=2).encode()
        (dst / "config.json").write_bytes(data)
        manifest["outputs"]["config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (dst / "requant-manifest.json").write_text(json.dumps(seal(manifest)))
        return _verify(dst, capsys)

    rc, text = rewrite(lambda q: q["ignore"].remove(r"re:.*shared_experts.*"))
    assert rc == 2 and "ignore misses unquantized modules" in text and "shared_experts" in text
    rc, text = rewrite(lambda q: q["ignore"].append(r"re:.*experts\.0\..*"))
    assert rc == 2 and "ignore matches quantized modules, e.g. language_model.model.layers.1.mlp.experts.0." in text
    rc, text = rewrite(lambda q: q.update(format="nvfp4-pack-quantized"))
    assert rc == 2 and "does not match recipe format mxfp4" in text


def test_modelopt_config_is_checked(tiny_upstream, tmp_path, capsys):
    """modelopt-nvfp4: hf_quant_config.json's exclude_modules must leave every quantized module quantized and name
    every unquantized matrix, declare the recipe's format, and be what config.json carries, even resealed."""
    import hashlib

    out = tmp_path / "modelopt"
    requant.convert(str(tiny_upstream), str(out), "modelopt-nvfp4", progress=False)
    assert _verify(out, capsys)[0] == 0

    def rewrite(edit, carry: bool = True):
        dst = tmp_path / f"edit-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out, dst)
        manifest = json.loads((dst / "requant-manifest.json").read_text())
        hf = json.loads((dst / "hf_quant_config.json").read_text())
        edit(hf["quantization"])
        config = json.loads((dst / "config.json").read_text())
        if carry:  # config.json carries the edited file, as Model Optimizer would write it
            config["quantization_config"]["ignore"] = hf["quantization"]["exclude_modules"]
            config["quantization_config"]["quant_algo"] = hf["quantization"]["quant_algo"]
        for name, data in (("hf_quant_config.json", json.dumps(hf, indent=4).encode()),
                           ("config.json", json.dumps(config, indent=2).encode())):
            (dst / name).write_bytes(data)
            manifest["outputs"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (dst / "requant-manifest.json").write_text(json.dumps(seal(manifest)))
        return _verify(dst, capsys)

    shared = "language_model.model.layers.1.mlp.shared_experts*"
    rc, text = rewrite(lambda q: q["exclude_modules"].remove(shared))
    assert rc == 2 and "exclude_modules misses unquantized modules" in text and "shared_experts" in text
    rc, text = rewrite(lambda q: q["exclude_modules"].append("*.experts.0.*"))
    assert rc == 2 and "exclude_modules matches quantized modules, e.g. language_model.model.layers.1.mlp.experts.0." in text
    rc, text = rewrite(lambda q: q.update(quant_algo="NVFP4"))
    assert rc == 2 and "do not match recipe format nvfp4" in text
    rc, text = rewrite(lambda q: q["exclude_modules"].remove(shared), carry=False)
    assert rc == 2 and "quantization_config does not carry hf_quant_config.json" in text
