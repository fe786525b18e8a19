"""lm-eval's GSM8K task, run by ``run_gsm8k`` against a real HTTP server that knows the answers.

lm-eval 0.4.13 is the oracle: a server that returns the reference answers must score exactly 1.0 on both filters,
wrong final numbers exactly 0.0, and a server that ignores ``stop`` loses ``flexible-extract`` (it takes the last
number, which is then the junk's) but keeps ``strict-match`` (it takes the first ``#### N``, the gold one).
The runs read the local copy of the data set and must not touch the network.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from gold_backend import JUNK_NUMBER, GoldBackend

from requant.errors import RequantError
from requant.evaluation.gsm8k import find_local_gsm8k, item_outcomes, load_result, run_gsm8k, server_root
from requant.evaluation.results import FILTERS, GSM8KResult

DATA_DIR = find_local_gsm8k(__file__) or Path("REQUANT_GSM8K_DIR-not-set-and-no-shared/data/gsm8k-found")
MODEL = "gold-model"
SEEDS = (42, 1234, 7777)
FEWSHOT = 3
SMALL = 8            # items per seed in the multi-seed run
UNTIL = ["Question:", "</s>", "<|im_end|>"]   # lm-eval 0.4.13 gsm8k.yaml generation_kwargs.until

# No skip when the data is missing: these are oracle checks, so a missing copy fails loudly.
pytestmark = [pytest.mark.oracle]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


class NetworkGuard:
    """Refuses, and records, every connection and name lookup that is not to the loopback interface."""

    LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

    def __init__(self):
        self.attempts: list[object] = []

    def __enter__(self) -> NetworkGuard:
        self._connect, self._getaddrinfo = socket.socket.connect, socket.getaddrinfo
        guard = self

        def connect(sock, address):
            if isinstance(address, tuple) and address[0] not in guard.LOOPBACK:
                guard.attempts.append(address)
                raise OSError(f"test forbids network access: {address}")
            return guard._connect(sock, address)

        def getaddrinfo(host, *args, **kwargs):
            if host is not None and (host.decode() if isinstance(host, bytes) else host) not in guard.LOOPBACK:
                guard.attempts.append(host)
                raise socket.gaierror(f"test forbids name lookups: {host}")
            return guard._getaddrinfo(host, *args, **kwargs)

        socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
        return self

    def __exit__(self, *exc) -> None:
        socket.socket.connect, socket.getaddrinfo = self._connect, self._getaddrinfo


@dataclass
class Run:
    result: GSM8KResult
    out_dir: Path
    requests: list[dict]
    auth_headers: list[str | None]
    network_attempts: list[object]
    env_changed: dict[str, tuple[str | None, str | None]]


def evaluate(out_dir: Path, mode: str, url_suffix: str = "", **kwargs) -> Run:
    watched = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OPENAI_API_KEY")
    env_before = {name: os.environ.get(name) for name in watched}
    with GoldBackend(DATA_DIR, mode, model=MODEL) as backend, NetworkGuard() as guard:
        result = run_gsm8k(backend.url + url_suffix, MODEL, variant=f"gold-backend-{mode}", gsm8k_dir=DATA_DIR,
                           out_dir=out_dir, num_fewshot=FEWSHOT, progress=False, **kwargs)
    env_changed = {name: (env_before[name], os.environ.get(name))
                   for name in watched if os.environ.get(name) != env_before[name]}
    return Run(result, out_dir, backend.requests, backend.auth_headers, guard.attempts, env_changed)


# Measured on the 2-core dev machine: the whole test split (1319 items, one seed) takes ~10 s here,
# about 0.6 s per 100 items plus ~2 s of lm-eval set-up, so the full split is affordable.
@pytest.fixture(scope="module")
def full_gold(tmp_path_factory) -> Run:
    return evaluate(tmp_path_factory.mktemp("full-gold"), "gold", seeds=(42,), limit=None)


@pytest.fixture(scope="module")
def seeds_gold(tmp_path_factory) -> Run:
    return evaluate(tmp_path_factory.mktemp("seeds-gold"), "gold", seeds=SEEDS, limit=SMALL)


@pytest.fixture(scope="module")
def wrong(tmp_path_factory) -> Run:
    return evaluate(tmp_path_factory.mktemp("wrong"), "wrong", url_suffix="/v1/completions", seeds=(1234,), limit=20)


@pytest.fixture(scope="module")
def ignore_stop(tmp_path_factory) -> Run:
    return evaluate(tmp_path_factory.mktemp("ignore-stop"), "ignore-stop", url_suffix="/v1", seeds=(7777,), limit=20)


@pytest.fixture(scope="module")
def train_answers() -> dict[str, str]:
    return {row["question"]: row["answer"] for row in read_jsonl(DATA_DIR / "train.jsonl")}


def test_gold_answers_score_one_on_the_whole_test_split(full_gold):
    result = full_gold.result
    n_test = len(read_jsonl(DATA_DIR / "test.jsonl"))
    assert result.doc_ids == list(range(n_test))
    assert result.scores == {name: {"42": 1.0} for name in FILTERS}
    assert all(result.items[name]["42"] == [1] * n_test for name in FILTERS)
    assert len(full_gold.requests) == n_test
    assert result.limit is None and result.seeds == [42] and result.num_fewshot == FEWSHOT


def test_gold_answers_score_one_for_every_seed(seeds_gold):
    result = seeds_gold.result
    assert result.seeds == list(SEEDS)
    assert result.doc_ids == list(range(SMALL))
    assert result.scores == {name: {str(seed): 1.0 for seed in SEEDS} for name in FILTERS}
    assert set(result.wall_seconds) == {str(seed) for seed in SEEDS}
    assert all(seconds > 0 for seconds in result.wall_seconds.values())
    assert len(seeds_gold.requests) == SMALL * len(SEEDS)


def test_wrong_final_numbers_score_zero(wrong):
    assert wrong.result.scores == {name: {"1234": 0.0} for name in FILTERS}
    assert all(wrong.result.items[name]["1234"] == [0] * 20 for name in FILTERS)


def test_ignoring_stop_loses_flexible_extract_but_not_strict_match(ignore_stop):
    assert ignore_stop.result.scores == {"flexible-extract": {"7777": 0.0}, "strict-match": {"7777": 1.0}}
    samples = read_jsonl(ignore_stop.out_dir / ignore_stop.result.samples["7777"])
    flexible = [s for s in samples if s["filter"] == "flexible-extract"]
    assert len(flexible) == 20
    # lm-eval does not cut at `stop` itself: the junk reaches the filters, whose last number is the junk's
    assert all(s["filtered_resps"] == [JUNK_NUMBER] and "\n\nQuestion:" in s["resps"][0][0] for s in flexible)


def test_requests_carry_the_task_generation_settings(full_gold):
    for body in full_gold.requests:
        assert isinstance(body["prompt"], str) and body["prompt"].endswith("\nAnswer:")
        assert body["model"] == MODEL
        assert body["stop"] == UNTIL        # no EOS string is added without a tokenizer
        assert body["max_tokens"] == 256 and body["temperature"] == 0


def test_samples_and_results_files_agree_with_the_result(seeds_gold):
    result, out_dir = seeds_gold.result, seeds_gold.out_dir
    assert load_result(out_dir) == result
    assert json.loads((out_dir / "gsm8k.json").read_text()) == result.to_json()
    for seed in map(str, SEEDS):
        assert result.samples[seed] == f"seed-{seed}/samples.jsonl"
        samples = read_jsonl(out_dir / result.samples[seed])
        assert len(samples) == SMALL * len(FILTERS)
        for name in FILTERS:
            records = sorted((s for s in samples if s["filter"] == name), key=lambda s: s["doc_id"])
            assert [s["doc_id"] for s in records] == result.doc_ids
            assert [int(s["exact_match"]) for s in records] == result.items[name][seed]
            assert all(s["doc"]["question"] and s["resps"] and s["arguments"] for s in records)
        aggregate = json.loads((out_dir / f"seed-{seed}" / "results.json").read_text())
        assert "samples" not in aggregate
        assert aggregate["config"]["fewshot_seed"] == int(seed) and aggregate["config"]["random_seed"] == int(seed)
        assert {name: aggregate["results"]["gsm8k"][f"exact_match,{name}"] for name in FILTERS} == \
            {name: result.scores[name][seed] for name in FILTERS}


def test_fewshot_prompts_come_from_train_and_follow_the_seed(seeds_gold, full_gold, train_answers):
    prompts = {}
    for run in (seeds_gold, full_gold):
        for seed, path in run.result.samples.items():
            for sample in read_jsonl(run.out_dir / path):
                if sample["filter"] == "strict-match" and sample["doc_id"] < SMALL:
                    prompts[run is full_gold, seed, sample["doc_id"]] = (sample["arguments"][0][0], sample["doc"])
    shots_by_seed = {}
    for (_, seed, _doc_id), (prompt, doc) in prompts.items():
        blocks = prompt.split("Question: ")[1:]
        assert len(blocks) == FEWSHOT + 1
        shots = [block.split("\nAnswer: ", 1)[0] for block in blocks[:-1]]
        expected = "".join(f"Question: {q}\nAnswer: {train_answers[q]}\n\n" for q in shots)
        assert prompt == expected + f"Question: {doc['question']}\nAnswer:"
        shots_by_seed.setdefault(seed, []).append(tuple(shots))
    # each seed draws other examples; the same seed draws the same ones in another run with another limit
    assert len({tuple(shots_by_seed[str(seed)]) for seed in SEEDS}) == len(SEEDS)
    assert all(prompts[True, "42", i] == prompts[False, "42", i] for i in range(SMALL))


def test_offline_task_is_lm_evals_gsm8k_reading_local_files(seeds_gold):
    import lm_eval.tasks

    upstream = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / "gsm8k/gsm8k.yaml").read_text())
    aggregate = json.loads((seeds_gold.out_dir / "seed-42/results.json").read_text())
    used = aggregate["configs"]["gsm8k"]
    assert list(aggregate["results"]) == ["gsm8k"] and used["task"] == "gsm8k"
    for key in ("doc_to_text", "doc_to_target", "training_split", "fewshot_split", "test_split", "output_type",
                "generation_kwargs", "filter_list", "metric_list", "repeats"):
        assert used[key] == upstream[key], key
    assert used["num_fewshot"] == FEWSHOT and used["generation_kwargs"]["until"] == UNTIL
    assert used["dataset_path"] == "json" and "dataset_name" not in used
    assert used["dataset_kwargs"]["data_files"] == {split: str((DATA_DIR / f"{split}.jsonl").resolve())
                                                    for split in ("train", "test")}


def test_offline_runs_touch_no_network_and_restore_the_environment(full_gold, seeds_gold, wrong, ignore_stop):
    for run in (full_gold, seeds_gold, wrong, ignore_stop):
        assert run.network_attempts == [] and run.env_changed == {}
    with NetworkGuard() as guard, pytest.raises(OSError):   # the guard does catch a real attempt
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    assert guard.attempts


def test_api_key_is_sent_and_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "outer-key")
    secret = "sk-requant-test-7f3a9c"
    run = evaluate(tmp_path, "gold", url_suffix="/v1/", seeds=(42,), limit=6, api_key=secret, num_concurrent=3)
    assert run.result.scores == {name: {"42": 1.0} for name in FILTERS}
    assert run.auth_headers == [f"Bearer {secret}"] * 6
    assert os.environ["OPENAI_API_KEY"] == "outer-key" and run.env_changed == {}
    assert run.result.base_url.endswith("/v1") and not run.result.base_url.endswith("/v1/v1")
    written = [path for path in tmp_path.rglob("*") if path.is_file() and secret in path.read_text()]
    assert written == []


def test_inconsistent_lm_eval_scores_are_caught(tmp_path, monkeypatch):
    import lm_eval

    original = lm_eval.simple_evaluate

    def misreporting(*args, **kwargs):
        output = original(*args, **kwargs)
        output["results"]["gsm8k"]["exact_match,strict-match"] = 0.5
        return output

    monkeypatch.setattr(lm_eval, "simple_evaluate", misreporting)
    with pytest.raises(RequantError, match="per-item mean 1.0 of 'strict-match'"):
        evaluate(tmp_path, "gold", seeds=(42,), limit=2)


@pytest.mark.parametrize("case", ["no-dir", "no-test", "bad-json", "no-answer"])
def test_bad_gsm8k_dir_names_the_file(tmp_path, case):
    gsm8k_dir = tmp_path / "gsm8k"
    row = json.dumps({"question": "q?", "answer": "a\n#### 1"})
    if case != "no-dir":
        gsm8k_dir.mkdir()
        (gsm8k_dir / "train.jsonl").write_text(row + "\n")
    if case == "bad-json":
        (gsm8k_dir / "test.jsonl").write_text(row + "\n{not json\n")
    if case == "no-answer":
        (gsm8k_dir / "test.jsonl").write_text(json.dumps({"question": "q?"}) + "\n")
    expected = {"no-dir": "train.jsonl: GSM8K split file not found",
                "no-test": "test.jsonl: GSM8K split file not found",
                "bad-json": "test.jsonl:2: not a JSON line", "no-answer": "test.jsonl:1: expected an object"}[case]
    with pytest.raises(RequantError) as info:
        run_gsm8k("http://127.0.0.1:9", MODEL, variant="x", gsm8k_dir=gsm8k_dir, out_dir=tmp_path / "out")
    message = str(info.value)
    assert expected in message and str(gsm8k_dir.resolve()) in message and "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1",
                                 "http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1/completions"])
def test_server_root_accepts_root_base_and_endpoint(url):
    assert server_root(url) == "http://127.0.0.1:8000"


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host/v1", "http:///v1"])
def test_server_root_rejects_other_urls(url):
    with pytest.raises(RequantError, match="base URL"):
        server_root(url)


def test_item_outcomes_rejects_samples_that_do_not_line_up():
    record = {"doc_id": 0, "filter": "strict-match", "exact_match": 1.0}
    with pytest.raises(RequantError, match="'flexible-extract' has samples for 0 of 1 docs"):
        item_outcomes([record], "x")
    with pytest.raises(RequantError, match="is not 0 or 1"):
        item_outcomes([{**record, "exact_match": 0.5}], "x")
    with pytest.raises(RequantError, match="no samples"):
        item_outcomes([], "x")
    both = [record, {**record, "filter": "flexible-extract", "exact_match": 0.0}]
    assert item_outcomes(both, "x") == ([0], {"flexible-extract": [0], "strict-match": [1]})
