"""The model card: rendered from a checkpoint's facts, parsed by huggingface_hub (the oracle for the metadata), its
numbers checked against the safetensors headers, config.json and the evaluation's Comparison."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import struct
import warnings
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import pytest
from huggingface_hub import ModelCard

import requant
from requant.card import CardFacts, ReleaseFacts, licence, render_card
from requant.errors import RequantError
from requant.evaluation import report
from requant.evaluation.downstream import write_report
from requant.evaluation.publish import publish_evaluation
from requant.evaluation.results import FILTERS, GSM8KResult
from requant.io.storage import LocalDir
from requant.manifest import MANIFEST_FILE
from requant.verification import verify

RECIPES = ("kimi-k2.6-mxfp4", "amd-kimi-k25-mxfp4-attn-fp8")
SEEDS = [42, 1234, 7777]
SMOKE = {"passed": True, "checks": [{"name": "chat completion", "passed": True, "detail": "200 OK in 0.4 s"}]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_upstream):
    root = tmp_path_factory.mktemp("card")
    for recipe in RECIPES:
        requant.convert(str(tiny_upstream), str(root / recipe), recipe, progress=False)
    return {recipe: root / recipe for recipe in RECIPES}


@pytest.fixture
def copy(checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["kimi-k2.6-mxfp4"], dst)
    return dst


@contextmanager
def no_warnings():
    """Fails if the block warns, through ``warnings`` or huggingface_hub's own logger."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        hub_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == [] and [r.getMessage() for r in records] == []


def test_the_check_sees_a_warning():
    with pytest.raises(AssertionError):
        with no_warnings():
            ModelCard("# a card without metadata\n")


def section(card: str, heading: str) -> str:
    return card.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def manifest_of(path) -> dict:
    return json.loads((path / MANIFEST_FILE).read_text())


# ---------------------------------------------------------------- metadata


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_card_parses_on_the_hub_without_warnings(checkpoints, recipe):
    path = checkpoints[recipe]
    with no_warnings():
        card = ModelCard.load(path / "README.md")
    upstream = manifest_of(path)["upstream"]
    assert card.data.base_model == upstream["id"] and card.data.base_model_relation == "quantized"
    # the synthetic upstream's card has no metadata: "other", named, linked to the licence file kept verbatim
    assert (card.data.license, card.data.license_link) == ("other", "LICENSE") and card.data.license_name
    assert (path / card.data.license_link).read_bytes() == (path / "LICENSE").read_bytes()
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"mxfp4", "quark", recipe, "requant", "moe"} <= set(card.data.tags)
    assert ("fp8" in card.data.tags) == ("attn-fp8" in recipe)


def test_a_licence_the_upstream_card_names_is_used(checkpoints):
    facts = CardFacts.from_checkpoint(LocalDir(checkpoints["kimi-k2.6-mxfp4"]))
    assert licence(dataclasses.replace(facts, upstream_meta={"license": "mit"})) == {"license": "mit"}
    named = dataclasses.replace(facts, upstream_meta={"license": "other", "license_name": "modified-mit"})
    assert licence(named) == {"license": "other", "license_name": "modified-mit", "license_link": "LICENSE"}
    with no_warnings():
        assert ModelCard(render_card(named)).data.license_name == "modified-mit"


# ---------------------------------------------------------------- numbers against the checkpoint itself


def read_headers(path) -> dict[str, dict]:
    """Every tensor of the checkpoint's shards, from the safetensors headers (8-byte length, then JSON)."""
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        with shard.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        tensors.update(header)
    return tensors


def storage_counts(tensors: dict[str, dict]) -> dict[str, list[int]]:
    """[tensors, parameters, bytes] per storage, independently of requant: a module with a ``weight_scale`` is
    MXFP4 if its weight is U8 (two E2M1 codes per byte), FP8 if F8_E4M3; everything else counts by its dtype."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, t in tensors.items():
        module, _, param = name.rpartition(".")
        numel, nbytes = int(np.prod(t["shape"])), t["data_offsets"][1] - t["data_offsets"][0]
        storage, params = t["dtype"], numel
        if param in ("weight", "weight_scale") and f"{module}.weight_scale" in tensors:
            weight = tensors[f"{module}.weight"]["dtype"]
            storage = {"U8": "MXFP4", "F8_E4M3": "FP8 per channel"}[weight]
            params = 0 if param == "weight_scale" else numel * (2 if weight == "U8" else 1)
        counts[storage][0] += 1
        counts[storage][1] += params
        counts[storage][2] += nbytes
    return dict(counts)


def table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.parametrize("recipe", RECIPES)
def test_coverage_counts_equal_the_safetensors_headers(checkpoints, recipe):
    path = checkpoints[recipe]
    card = (path / "README.md").read_text()
    rows = table(section(card, "Coverage"), "| stored as | tensors | parameters | share of parameters | bytes |")
    shown = {r[0]: [int(r[1].replace(",", "")), int(r[2].replace(",", "")), int(r[4].replace(",", ""))] for r in rows}
    expected = storage_counts(read_headers(path))
    assert shown == expected
    assert ("FP8 per channel" in shown) == ("attn-fp8" in recipe) and "MXFP4" in shown
    total = sum(c[1] for c in expected.values())
    assert f"| parameters | {total:,} in all;" in card  # the architecture's parameter count


@pytest.mark.parametrize("recipe", RECIPES)
def test_weight_memory_per_gpu_is_the_tensor_bytes_over_eight(checkpoints, recipe):
    path = checkpoints[recipe]
    card = (path / "README.md").read_text()
    total = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in read_headers(path).values())
    serving = section(card, "Serving")
    assert f"({total:,} bytes of tensor data / 8)" in serving
    assert f"**{total / 8 / 2**30:.2f} GiB per GPU**" in serving and "TP=8" in serving and "Weights only" in serving


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_quantization_config_block_is_config_json_s(checkpoints, recipe):
    path = checkpoints[recipe]
    card = (path / "README.md").read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", section(card, "Reproduction"), re.DOTALL)
    assert len(blocks) == 1
    assert json.loads(blocks[0]) == json.loads((path / "config.json").read_text())["quantization_config"]
    upstream = manifest_of(path)["upstream"]
    assert f"--recipe {recipe}" in card and upstream["revision"] in section(card, "Reproduction")


def test_serving_offers_only_the_engines_expected_to_load_the_checkpoint(checkpoints):
    routers = (checkpoints["kimi-k2.6-mxfp4"] / "README.md").read_text()
    assert "**vLLM**: not expected to load" in routers and "vllm serve" not in routers
    assert "**SGLang**: not expected to load" in routers and "sglang.launch_server" not in routers
    assert "python -m atom.entrypoints.openai_server --model MODEL -tp 8" in routers
    assert "> **Serving note:** router quantized to MXFP4" in section(routers, "Limitations")
    released = render_card(CardFacts.from_checkpoint(LocalDir(checkpoints["amd-kimi-k25-mxfp4-attn-fp8"]),
                                                     release=ReleaseFacts(repo_id="org/Kimi-mxfp4-attn-fp8")))
    assert "vllm serve org/Kimi-mxfp4-attn-fp8 --tensor-parallel-size 8" in released
    assert "python -m sglang.launch_server --model-path org/Kimi-mxfp4-attn-fp8 --tp 8" in released
    assert released.split("\n---\n", 1)[1].lstrip().startswith("# org/Kimi-mxfp4-attn-fp8\n")


def test_the_card_is_its_checkpoint_s_facts_rendered_again(checkpoints):
    """Conversion wrote the card from the manifest before sealing it; the checkpoint's facts render the same card."""
    for path in checkpoints.values():
        assert render_card(CardFacts.from_checkpoint(LocalDir(path))) == (path / "README.md").read_text()


# ---------------------------------------------------------------- quality


def test_unevaluated_card_says_so(checkpoints):
    card = (checkpoints["kimi-k2.6-mxfp4"] / "README.md").read_text()
    quality = section(card, "Quality")
    assert quality.strip().startswith("Not evaluated.") and "release gate refuses" in quality
    assert "NOT EVALUATED" in card and "Released past the quality gate" not in card


def results(n_items: int = 200, lost: int = 12, seed: int = 0) -> tuple[GSM8KResult, GSM8KResult]:
    """A reference right on 150 + k items under the k-th seed; the candidate loses ``lost`` + 2k of them."""
    rng = np.random.default_rng(seed)
    ref_items, cand_items = defaultdict(dict), defaultdict(dict)
    for f in FILTERS:
        for k, s in enumerate(SEEDS):
            ref = np.zeros(n_items, dtype=int)
            ref[rng.permutation(n_items)[:150 + k]] = 1
            cand = ref.copy()
            cand[rng.permutation(np.flatnonzero(ref == 1))[:lost + 2 * k]] = 0
            ref_items[f][str(s)], cand_items[f][str(s)] = ref.tolist(), cand.tolist()

    def result(variant, items):
        scores = {f: {s: float(np.mean(v)) for s, v in per_seed.items()} for f, per_seed in items.items()}
        return GSM8KResult(variant=variant, model=variant, base_url="http://127.0.0.1:8000/v1", num_fewshot=3,
                           limit=n_items, seeds=list(SEEDS), doc_ids=list(range(n_items)), scores=scores,
                           items=dict(items))

    return result("kimi-k2.6-mxfp4", cand_items), result("fp8-reference", ref_items)


def _pct(text: str) -> tuple[float, float]:
    mean, stdev = text.split(" ± ")
    return float(mean), float(stdev)


def test_published_evaluation_renders_the_comparison_in_the_card(copy, tmp_path):
    report_dir = tmp_path / "report"
    context = {"engine": "vllm", "engines": {"candidate": "vllm", "reference": "vllm"}, "reference": "s3://b/fp8",
               "settings": {"seeds": SEEDS, "num_fewshot": 3, "limit": 200, "data": "hub:openai/gsm8k"}}
    comparison, body = write_report(*results(), SMOKE, report_dir, context=context)
    publish_evaluation(str(copy), report_dir, body, {"verdict": comparison.verdict})
    verify(str(copy))                                        # the new card is in the resealed manifest
    with no_warnings():
        card = ModelCard.load(copy / "README.md").content
    quality = section(card, "Quality")
    rows = {r[0]: r for r in table(quality, next(line for line in quality.splitlines() if line.startswith("| filter |")))}
    assert set(rows) == {fc.filter for fc in comparison.filters}
    for fc in comparison.filters:
        row = rows[fc.filter]
        for cell, scores in ((row[1], fc.candidate), (row[2], fc.reference)):
            assert _pct(cell) == pytest.approx((100 * scores.mean, 100 * scores.stdev), abs=0.005)
        assert float(row[3]) == pytest.approx(100 * fc.delta, abs=0.005)
        assert float(row[5]) == pytest.approx(fc.permutation.p_value, rel=0.01, abs=5e-4)
        assert float(row[7]) == pytest.approx(100 * fc.mde, abs=0.005)
    assert f"{comparison.n_items} items and seeds 42/1234/7777" in quality
    assert f"**Gate: {comparison.verdict}.**" in quality and "![GSM8K accuracy per seed](eval/gsm8k.png)" in quality
    assert "### Smoke test: passed" in quality and "served by `vllm`" in quality
    assert "Not evaluated" not in card and f"| GSM8K quality gate | {comparison.verdict} |" in card
    # one renderer: the card's section is the evaluation's, from the Comparison read back out of report.json
    assert report.quality_section(comparison, SMOKE, figure="eval/gsm8k.png").strip() in quality


def test_a_failed_smoke_test_is_what_the_card_says(copy, tmp_path):
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    smoke = {"passed": False, "checks": [{"name": "tool call", "passed": False, "detail": "no tool_calls"}]}
    (report_dir / "smoke.json").write_text(json.dumps(smoke))
    publish_evaluation(str(copy), report_dir, None, {"smoke_passed": False})
    card = (copy / "README.md").read_text()
    quality = section(card, "Quality")
    assert "smoke test came first and failed" in quality and "### Smoke test: FAILED" in quality
    assert "❌ tool call: no tool_calls" in quality and "SMOKE TEST FAILED" in card
    verify(str(copy))


def test_a_forced_release_says_so_and_why(copy):
    facts = CardFacts.from_checkpoint(LocalDir(copy), release=ReleaseFacts("org/k26-mxfp4", forced="needed for a demo"))
    card = render_card(facts)
    banner = card.split("# org/k26-mxfp4\n", 1)[1].lstrip().splitlines()[0]
    assert banner.startswith("> ⚠️ **Released past the quality gate.**") and "NOT EVALUATED" in banner
    assert banner.endswith("needed for a demo")


def test_a_report_that_is_not_a_comparison_is_refused(copy, tmp_path):
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "report.json").write_text(json.dumps({"comparison": {"verdict": "PASS"}}))
    with pytest.raises(RequantError, match="eval/report.json: not a comparison requant wrote"):
        publish_evaluation(str(copy), report_dir, None, {"verdict": "PASS"})


def test_comparison_round_trips_through_its_json():
    from requant.evaluation.compare import compare

    comparison = compare(*results(n_items=60, lost=3), n_boot=200)
    data = json.loads(json.dumps(comparison.to_json()))
    assert report.comparison_from_json(data).to_json() == comparison.to_json()
    assert report.markdown(report.comparison_from_json(data)) == report.markdown(comparison)
    data["filters"][0]["candidate"]["seeds"] = ["42"]
    with pytest.raises(RequantError, match="x.json: not a comparison"):
        report.comparison_from_json(data, "x.json")


@pytest.mark.parametrize("name, is_licence", [("LICENSE", True), ("LICENSE.txt", True), ("license.md", True),
                                              ("LICENSE-MIT", True), ("COPYING", True), ("LICENCE", True),
                                              ("licenses/LICENSE", False), ("license_notes.py", False),
                                              ("README.md", False)])
def test_the_licence_files_an_upstream_may_ship(name, is_licence):
    from requant.card import LICENSE_FILE

    assert bool(LICENSE_FILE.fullmatch(name)) is is_licence
