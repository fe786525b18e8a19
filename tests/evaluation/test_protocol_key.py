"""The reference's cached GSM8K result is keyed by the evaluation protocol (requant.evaluation.downstream): change
any field that can change the scores and the key changes, so the result cached under the old key is not reused."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import requant
import requant.evaluation.downstream as downstream
from requant.evaluation.downstream import EvalSettings, cached_result
from requant.evaluation.gsm8k import find_local_gsm8k
from requant.evaluation.publish import publish_evaluation
from requant.evaluation.results import GSM8KResult
from requant.verification import verify

ENGINE = "reference"
BASE = EvalSettings(seeds=(42, 1234, 7777), num_fewshot=3, limit=5, gsm8k_dir=str(find_local_gsm8k(__file__)))


def _copy_data(tmp_path, name: str, edit=None) -> str:
    """The GSM8K rows in another directory (without SHA256SUMS: a user's own copy), optionally edited."""
    dst = tmp_path / name
    dst.mkdir()
    for split in ("train.jsonl", "test.jsonl"):
        shutil.copyfile(f"{BASE.gsm8k_dir}/{split}", dst / split)
    if edit:
        edit(dst / "test.jsonl")
    return str(dst)


def _change_last_answer(path) -> None:
    rows = path.read_text(encoding="utf-8").splitlines()
    row = json.loads(rows[-1])
    number = row["answer"].rsplit("#### ", 1)[1]
    row["answer"] = row["answer"][: -len(number)] + str(int(number.replace(",", "")) + 1)
    rows[-1] = json.dumps(row)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def changed_keys(tmp_path_factory) -> dict[str, str]:
    """One protocol change at a time -> the key it gives."""
    tmp = tmp_path_factory.mktemp("protocol")
    keys = {
        "seeds": dataclasses.replace(BASE, seeds=(42, 1234)).protocol_key(ENGINE),
        "a different seed": dataclasses.replace(BASE, seeds=(42, 1234, 7778)).protocol_key(ENGINE),
        "num_fewshot": dataclasses.replace(BASE, num_fewshot=5).protocol_key(ENGINE),
        "limit": dataclasses.replace(BASE, limit=6).protocol_key(ENGINE),
        "no limit (all 1319 items)": dataclasses.replace(BASE, limit=None).protocol_key(ENGINE),
        "hub data instead of local rows": dataclasses.replace(BASE, gsm8k_dir=None).protocol_key(ENGINE),
        "one test answer changed": dataclasses.replace(
            BASE, gsm8k_dir=_copy_data(tmp, "edited", _change_last_answer)).protocol_key(ENGINE),
        "engine": BASE.protocol_key("vllm"),
        "external reference server": BASE.protocol_key("external"),
    }
    with pytest.MonkeyPatch.context() as mp:
        real = downstream.version
        mp.setattr(downstream, "version", lambda dist: "0.4.99" if dist == "lm_eval" else real(dist))
        keys["lm-eval version"] = BASE.protocol_key(ENGINE)
    return keys


def test_every_protocol_change_changes_the_key(changed_keys):
    base = BASE.protocol_key(ENGINE)
    assert base == BASE.protocol_key(ENGINE)
    same = [change for change, key in changed_keys.items() if key == base]
    assert not same, f"the cache key ignores: {same}"
    assert len(set(changed_keys.values())) == len(changed_keys)


def test_what_cannot_change_the_scores_keeps_the_key(tmp_path):
    base = BASE.protocol_key(ENGINE)
    assert dataclasses.replace(BASE, gsm8k_dir=_copy_data(tmp_path, "same-rows")).protocol_key(ENGINE) == base
    assert dataclasses.replace(BASE, num_concurrent=8).protocol_key(ENGINE) == base


def test_result_cached_under_the_old_key_is_not_reused(changed_keys, tiny_upstream, tmp_path):
    """The flow publishes the reference's run under eval/gsm8k-<key>/ and looks it up by the current key."""
    reference = tmp_path / "fp8-reference"
    requant.convert(str(tiny_upstream), str(reference), "fp8-reference", progress=False)
    old = BASE.protocol_key(ENGINE)
    result = GSM8KResult(variant="fp8-reference", model="ref", base_url="http://127.0.0.1:9/v1", num_fewshot=3,
                         limit=5, seeds=[42, 1234, 7777], doc_ids=[0, 1, 2, 3, 4],
                         scores={"strict-match": {"42": 0.8}}, items={"strict-match": {"42": [1, 1, 0, 1, 1]}})
    run_dir = tmp_path / "reference-eval"
    run_dir.mkdir()
    (run_dir / "gsm8k.json").write_text(json.dumps(result.to_json()))
    publish_evaluation(str(reference), run_dir, None, {"gsm8k_protocol": old}, prefix=f"eval/gsm8k-{old}")
    verify(str(reference))

    assert cached_result(str(reference), old) == result               # same protocol: reused
    for change, key in changed_keys.items():
        assert cached_result(str(reference), key) is None, f"{change}: the old protocol's result was reused"
