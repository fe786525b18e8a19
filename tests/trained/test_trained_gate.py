"""The trained model in the loop: its INT4 upstream is what compressed-tensors decodes, the smoke test passes every
honest recipe and stops every damaged conversion (saying which layer and experts), and the GSM8K gate fails a
damage the smoke test cannot see.

Everything is served by `requant serve` and scored by lm-eval's gsm8k task (through /v1/completions) on the
model's own task (``requant:trained``), ITEMS test items x 3 seeds, against the fp8-reference as the flow does.
The damaged conversions are requant.testing.trained.damage.CATALOG's, resealed so `requant verify` passes them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from compressed_tensors.compressors.quantized_compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs
from safetensors import safe_open
from safetensors.torch import load_file

import requant
import requant.testing.trained
from requant.engines.engines import launch, load_engines
from requant.errors import RequantError
from requant.evaluation.gsm8k import TRAINED_TASK, check_gsm8k_dir
from requant.evaluation.judge import Protocol, evaluate_reference, serve_and_judge
from requant.evaluation.report import format_table
from requant.recipe import builtins_in
from requant.testing.synth import int4_fake_quantize, synthesize, trained_assets
from requant.testing.trained.damage import CATALOG, damage, unseen_rows
from requant.verification import verify

ITEMS = 100          # test items per seed
PROTOCOL = Protocol(TRAINED_TASK, (42, 1234, 7777), ITEMS)
ONE_SEED = Protocol(TRAINED_TASK, (42,), ITEMS)
RECIPES = builtins_in("trained")  # the built-in recipes whose files name this lane (`lanes:`, default all)
SMOKE_STOPPED = [d for d in CATALOG if d.kind != "embed-rows-zeroed"]


@pytest.fixture(scope="session")
def trained_variants(tmp_path_factory, trained_upstream):
    root = tmp_path_factory.mktemp("trained")
    paths = {"int4-upstream": trained_upstream}
    for recipe in RECIPES:
        requant.convert(str(trained_upstream), str(root / recipe), recipe, progress=False)
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
    return evaluate_reference(fp8_trained, PROTOCOL, tmp_path_factory.mktemp("eval") / "fp8-reference")


def _judge(path, name, trained_variants, fp8_trained, reference_result, tmp_path_factory, protocol=PROTOCOL, **kw):
    """What the evaluation flow decides, with the flow's prompts and limits: smoke test, then GSM8K if it passed
    (on ``protocol``'s seeds; the comparison pairs the seeds both variants ran)."""
    j = serve_and_judge(path, name, fp8_trained, trained_variants["fp8-reference"], reference_result, protocol,
                        tmp_path_factory.mktemp("eval") / name, tmp_path_factory.mktemp("serve-logs"), **kw)
    seq = j.smoke["numeric"]["sequence"]
    print(f"\n{name}: smoke {'passed' if j.smoke['passed'] else 'FAILED'} in {j.smoke_seconds:.1f}s (sequence top-1 "
          f"{seq.get('top1_agreement')}, mean KL {seq.get('mean_kl', float('nan')):.4f})")
    if j.comparison is not None:
        print(format_table(j.comparison))
    return j


@pytest.fixture(scope="session")
def int4_judgement(trained_variants, fp8_trained, fp8_trained_result, tmp_path_factory):
    return _judge(trained_variants["int4-upstream"], "int4-upstream", trained_variants, fp8_trained,
                  fp8_trained_result, tmp_path_factory)


def test_assets_are_checked_and_a_changed_byte_names_its_file(tmp_path, monkeypatch):
    root = trained_assets()
    copy = tmp_path / "assets"
    shutil.copytree(root, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-3] ^= 0x01                                                 # a weight's low bit: only the digest can tell
    (copy / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(requant.testing.trained, "ASSETS", copy)
    with pytest.raises(RequantError, match=r"model\.safetensors: sha256 .* does not match SHA256SUMS"):
        synthesize(tmp_path / "out", "trained", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.oracle
def test_int4_upstream_decodes_through_compressed_tensors_to_what_training_saw(trained_variants):
    """Every routed expert of the upstream, decompressed by compressed-tensors' own pack-quantized compressor with
    the quantization args of the upstream's config, equals the quantization-aware training's forward weight
    (int4_fake_quantize of the shipped master) bit for bit."""
    master = load_file(str(trained_assets() / "model.safetensors"))
    up = trained_variants["int4-upstream"]
    config = json.loads((up / "config.json").read_text())
    quant = config.get("text_config", config).get("quantization_config") or config["quantization_config"]
    assert quant["format"] == CompressionFormat.pack_quantized.value
    args = QuantizationArgs(**quant["config_groups"]["group_0"]["weights"])
    compressor = PackedQuantizationCompressor()
    checked = 0
    for shard in sorted(up.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                if not name.endswith(".weight_packed"):
                    continue
                module = name.removesuffix(".weight_packed")
                data = {k: f.get_tensor(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
                decoded = compressor.decompress_weight(data, quantization_args=args)
                expected = int4_fake_quantize(master[f"{module.removeprefix('language_model.')}.weight"].float())
                assert decoded.dtype == torch.bfloat16 and torch.equal(decoded.float(), expected), module
                checked += 1
    assert checked == 2 * 8 * 3                                       # 2 MoE layers x 8 experts x gate/up/down


def test_the_int4_upstream_passes_the_gate_with_power(int4_judgement, fp8_trained_result):
    """The reference answers (so the verdict is never INCONCLUSIVE), the comparison could see a drop of a few
    points, and the INT4 upstream (which the FP8 reference is a lossless re-encoding of, for this model) PASSes."""
    reference = fp8_trained_result.scores["flexible-extract"]
    assert sum(reference.values()) / len(reference) >= 0.8
    j = int4_judgement
    assert j.smoke["passed"], j.smoke["checks"]
    assert j.comparison.verdict == "PASS", format_table(j.comparison)
    assert j.comparison.filter("flexible-extract").mde < 0.10


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_honest_recipe_passes_the_smoke_test(recipe, trained_variants, fp8_trained, tmp_path_factory):
    """Every built-in recipe's conversion passes, with every expert of every MoE layer reached by the scored text
    and no localization (that runs only on failure)."""
    smoke = _judge(trained_variants[recipe], recipe, trained_variants, fp8_trained, None, tmp_path_factory).smoke
    assert smoke["passed"], [c for c in smoke["checks"] if not c["passed"]]
    coverage = next(c for c in smoke["checks"] if c["name"] == "expert coverage")
    assert coverage["passed"] and smoke["numeric"]["coverage"]["moe_layers"] == 2
    assert "localization" not in smoke["numeric"]


@pytest.mark.parametrize("damaged", SMOKE_STOPPED, ids=[d.name for d in SMOKE_STOPPED])
def test_a_damaged_conversion_is_stopped_by_the_smoke_test_which_says_where(damaged, trained_variants, fp8_trained,
                                                                             tmp_path_factory):
    """Few-expert and whole-model damages, resealed (verify passes), fail the sequence agreement before any GSM8K
    run, and the localization names the first damaged layer and exactly the damaged experts (or the router)."""
    broken = damage(trained_variants[damaged.base], tmp_path_factory.mktemp("damaged") / damaged.name, damaged.kind,
                    experts=list(damaged.experts) if damaged.experts else None)
    verify(str(broken))                                              # resealed: integrity checks cannot tell
    j = _judge(broken, damaged.name, trained_variants, fp8_trained, None, tmp_path_factory)
    assert j.stopped and not j.smoke["passed"]
    failed = {c["name"] for c in j.smoke["checks"] if not c["passed"]}
    assert "sequence agreement with reference" in failed, j.smoke["checks"]
    loc = j.smoke["numeric"]["localization"]
    assert loc["available"] and loc["first_layer"] == 1, loc["summary"]     # layer 0 is dense, 1 the first MoE
    flagged = {(row["layer"], e) for row in loc["layers"] for e in row.get("flagged_experts", [])}
    if damaged.kind.startswith("experts-"):
        from requant.testing.trained.damage import DEFAULT_EXPERTS, default_experts

        expected = set(damaged.experts or default_experts(broken, DEFAULT_EXPERTS[damaged.kind]))
        assert flagged == expected, loc["summary"]
    elif damaged.kind == "router-zeroed":
        assert loc["layers"][1]["flagged"] == ["router"] and not flagged, loc["summary"]
    else:                                                            # every routed expert of every MoE layer
        assert flagged == {(layer, e) for layer in (1, 2) for e in range(8)}, loc["summary"]


def test_a_damage_the_smoke_test_cannot_see_is_failed_by_the_gate(int4_judgement, trained_variants, fp8_trained,
                                                                  fp8_trained_result, tmp_path_factory):
    """A span of embedding rows zeroed (a torn write) that no smoke text uses but many gold answers do, on the
    INT4 upstream, which PASSes undamaged: the smoke test's figures equal the undamaged upstream's exactly (it
    cannot see the damage), and the GSM8K gate FAILs it, so the gate's FAIL comes from damage, not a recipe."""
    texts = int4_judgement.smoke["numeric"]["sequence"]["texts"]
    answers = [json.loads(line)["answer"] for line in check_gsm8k_dir(TRAINED_TASK)["test"].read_text().splitlines()
               if line.strip()][:ITEMS]
    rows = unseen_rows(trained_variants["int4-upstream"], texts, answers)
    broken = damage(trained_variants["int4-upstream"], tmp_path_factory.mktemp("damaged") / "embed", "embed-rows-zeroed",
                    rows=rows)
    # One seed: with the rows chosen from these ITEMS=100 gold answers this damage cost 19 pp on this machine
    # (flexible-extract, 0/19 discordant pairs, p 4e-06, 2026-12-06), far above the 12 pp one seed detects. The
    # committed results/trained measured it on 50 items x 1 seed (make measure-trained chooses the rows from those 50
    # answers): 92% vs 96%, -4 pp, McNemar 0/2, and the gate PASSed it there: too few items use the zeroed rows.
    j = _judge(broken, "embed-rows-zeroed", trained_variants, fp8_trained, fp8_trained_result, tmp_path_factory,
               protocol=ONE_SEED)
    assert j.smoke["passed"], [c for c in j.smoke["checks"] if not c["passed"]]
    undamaged = int4_judgement.smoke["numeric"]["sequence"]
    for key in ("top1_agreement", "mean_kl", "max_prompt_kl", "exact_match", "per_prompt"):
        assert j.smoke["numeric"]["sequence"][key] == undamaged[key], key
    assert j.comparison.verdict == "FAIL", format_table(j.comparison)
    assert int4_judgement.comparison.verdict == "PASS"


# The trained model published in each other upstream format the family ships, converted as the flow converts it: the
# default recipe and the FP8 reference from the same upstream, the smoke test and the gate downstream, on one seed of
# SOURCE_ITEMS items. The smoke test is what sees a source decoded wrongly (its sequence agreement and per-expert
# coverage); the gate shows the model still answers, and can see only large drops here (the three-seed gate with its
# power is the INT4 upstream's, above).
OTHER_SOURCES = ("fp8-block", "mxfp4", "bf16")
SOURCE_ITEMS = 50
SOURCE_PROTOCOL = Protocol(TRAINED_TASK, (42,), SOURCE_ITEMS)


@pytest.mark.parametrize("source", OTHER_SOURCES)
def test_the_trained_model_passes_the_gate_from_every_upstream_format(source, tmp_path_factory):
    upstream = synthesize(tmp_path_factory.mktemp("upstream") / source, "trained", progress=False, source=source)
    root = tmp_path_factory.mktemp(f"converted-{source}")
    for recipe in ("fp8-reference", requant.DEFAULT_RECIPE):
        requant.convert(str(upstream), str(root / recipe), recipe, progress=False)
        assert json.loads((root / recipe / "requant-manifest.json").read_text())["source"]["format"] == source
    variants = {"fp8-reference": root / "fp8-reference"}
    with _serve(variants["fp8-reference"], "fp8-reference", tmp_path_factory) as reference:
        reference_result = evaluate_reference(reference, SOURCE_PROTOCOL, tmp_path_factory.mktemp("eval") / source)
        j = _judge(root / requant.DEFAULT_RECIPE, f"{source}-{requant.DEFAULT_RECIPE}", variants, reference,
                   reference_result, tmp_path_factory, protocol=SOURCE_PROTOCOL)
    scores = reference_result.scores["flexible-extract"]
    assert sum(scores.values()) / len(scores) >= 0.8, scores  # the model still answers, published this way
    assert j.smoke["passed"], [c for c in j.smoke["checks"] if not c["passed"]]
    assert j.comparison.verdict == "PASS", format_table(j.comparison)
