"""The trained model in the loop: the shipped weights answer, their INT4 upstream is what compressed-tensors
decodes, and the downstream gate tells honest conversions from broken ones.

Everything is served by `requant serve` and scored by lm-eval's gsm8k task (through /v1/completions) on the
model's own task (``requant:trained``), ITEMS test items x 3 seeds, against the fp8-reference as the flow does.
Damaged conversions (requant.trained.damage) must be stopped by the smoke test or failed by the gate.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compressed_tensors.compressors.quantized_compressors.pack_quantized import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import load_file

import requant.trained
from requant.convert import convert_local
from requant.engines.engines import launch, load_engines
from requant.engines.smoke import load_limits, smoke_test, task_prompts
from requant.errors import RequantError
from requant.evaluation.compare import compare
from requant.evaluation.gsm8k import TRAINED_TASK, run_gsm8k
from requant.evaluation.report import format_table
from requant.synth import int4_fake_quantize, synthesize, trained_assets
from requant.trained.damage import DAMAGES, damage

ITEMS = 100          # test items per seed
SEEDS = [42, 1234, 7777]
RECIPES = ("fp8-reference", "kimi-k2.6-mxfp4")


@pytest.fixture(scope="session")
def trained_variants(tmp_path_factory, trained_upstream):
    root = tmp_path_factory.mktemp("trained")
    paths = {"int4-upstream": trained_upstream}
    for recipe in RECIPES:
        convert_local(str(paths["int4-upstream"]), str(root / recipe), recipe, progress=False)
        paths[recipe] = root / recipe
    return paths


def _serve(path, name, tmp_path_factory):
    return launch(load_engines()["reference"], str(path), served_model_name=name,
                  log_dir=tmp_path_factory.mktemp("serve-logs"), max_model_len=4096)


@pytest.fixture(scope="session")
def fp8_trained(trained_variants, tmp_path_factory):
    with _serve(trained_variants["fp8-reference"], "fp8-reference", tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="session")
def fp8_trained_result(fp8_trained, tmp_path_factory):
    return run_gsm8k(fp8_trained.base_url, "fp8-reference", variant="fp8-reference", seeds=SEEDS, limit=ITEMS,
                     gsm8k_dir=TRAINED_TASK, out_dir=tmp_path_factory.mktemp("eval") / "fp8-reference",
                     progress=False)


def test_assets_are_checked_and_a_changed_byte_names_its_file(tmp_path, monkeypatch):
    root = trained_assets()
    log = json.loads((root / "training.json").read_text())
    assert log["fp32_greedy_accuracy"] >= 0.8 and log["accuracy_items"] >= 200
    copy = tmp_path / "assets"
    shutil.copytree(root, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0x01                                                 # a weight's low bit: only the digest can tell
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(requant.trained, "ASSETS", copy)
    with pytest.raises(RequantError, match=r"model\.safetensors: sha256 .* does not match SHA256SUMS"):
        synthesize(tmp_path / "out", "trained", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.oracle
def test_int4_upstream_decodes_through_compressed_tensors_to_what_training_saw(trained_variants):
    """Every routed expert of the upstream, unpacked by compressed-tensors and scaled, equals the quantization-
    aware training's forward weight (int4_fake_quantize of the shipped master) bit for bit."""
    master = load_file(str(trained_assets() / "model.safetensors"))
    up = trained_variants["int4-upstream"]
    checked = 0
    for shard in sorted(up.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if not name.endswith(".weight_packed"):
                    continue
                module = name.removesuffix(".weight_packed")
                shape = f.get_tensor(f"{module}.weight_shape").tolist()
                codes = unpack_from_int32(f.get_tensor(name), 4, torch.Size(shape))
                scale = f.get_tensor(f"{module}.weight_scale")
                decoded = (codes.to(torch.bfloat16) * scale.repeat_interleave(32, dim=1)[:, :shape[1]])
                local = module.removeprefix("language_model.")
                expected = int4_fake_quantize(master[f"{local}.weight"].float())
                assert torch.equal(decoded.float(), expected), module
                checked += 1
    assert checked == 2 * 8 * 3                                       # 2 MoE layers x 8 experts x gate/up/down


def _judge(server, fp8_trained, reference_result, out_dir):
    """What the evaluation flow decides: the smoke test, then (only if it passed) the GSM8K comparison."""
    smoke = smoke_test(server, fp8_trained, load_limits(), task_prompts(TRAINED_TASK))  # as the flow does
    print(f"\nsmoke {'passed' if smoke['passed'] else 'FAILED'} (top-1 {smoke['numeric']['top1_agreement']:.2f}, "
          f"KL {smoke['numeric']['mean_kl']:.4f})")
    if not smoke["passed"]:
        return smoke, None
    result = run_gsm8k(server.base_url, server.served_model_name, variant=server.served_model_name, seeds=SEEDS,
                       limit=ITEMS, gsm8k_dir=TRAINED_TASK, out_dir=out_dir, progress=False)
    comparison = compare(result, reference_result)
    print(format_table(comparison))
    return smoke, comparison


@pytest.mark.parametrize("variant", ["int4-upstream", "kimi-k2.6-mxfp4"])
def test_honest_variants_are_judged_with_power(variant, trained_variants, fp8_trained, fp8_trained_result,
                                               tmp_path_factory):
    """The reference answers (so the verdict is PASS or FAIL, never INCONCLUSIVE), the comparison could see a
    drop of a few points, and the honest variants pass their smoke test. Their Δ is reported, not asserted."""
    reference = fp8_trained_result.scores["flexible-extract"]
    assert sum(reference.values()) / len(reference) >= 0.8
    with _serve(trained_variants[variant], variant, tmp_path_factory) as server:
        smoke, comparison = _judge(server, fp8_trained, fp8_trained_result, tmp_path_factory.mktemp("eval") / variant)
    assert smoke["passed"], smoke["checks"]
    assert comparison.verdict in ("PASS", "FAIL")
    assert comparison.filter("flexible-extract").mde < 0.10


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_a_damaged_conversion_is_stopped(kind, trained_variants, fp8_trained, fp8_trained_result, tmp_path_factory):
    """A converter bug that seals its output (verify passes) must fail the smoke test or the gate."""
    from requant.verify import verify

    broken = damage(trained_variants["kimi-k2.6-mxfp4"], tmp_path_factory.mktemp("damaged") / kind, kind)
    verify(str(broken))                                              # resealed: integrity checks cannot tell
    with _serve(broken, f"damaged-{kind}", tmp_path_factory) as server:
        smoke, comparison = _judge(server, fp8_trained, fp8_trained_result, tmp_path_factory.mktemp("eval") / kind)
    assert not smoke["passed"] or comparison.verdict == "FAIL"
