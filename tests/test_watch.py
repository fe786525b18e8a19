"""The watcher's pieces without services: revision markers, conditional claims, the decision table, and the
content fingerprint (on the local Hub, which publishes the sha256 of weight files)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from requant.errors import RequantError
from requant.testing.synth import synthesize
from requant.watch import (
    Attempt,
    Ledger,
    content_fingerprint,
    decide,
    declared_source,
    is_documentation,
    latest_revision,
    source_change,
)


def test_mirror_revision_marker(tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs/main").write_text("abc123\n")
    rev = latest_revision(str(tmp_path))
    assert rev.revision == "abc123" and rev.snapshot == f"{tmp_path}/snapshots/abc123"
    (tmp_path / "refs/main").write_text("../../etc/passwd")
    with pytest.raises(RequantError, match="not a revision id"):
        latest_revision(str(tmp_path))
    with pytest.raises(RequantError, match="no refs/dev"):
        latest_revision(str(tmp_path), ref="dev")


def test_only_one_of_many_concurrent_claims_wins(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger"))
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda i: ledger.claim("rev1", 1, f"w{i}"), range(16)))
    assert wins.count(True) == 1
    attempts = ledger.attempts("rev1")
    assert [a.number for a in attempts] == [1] and attempts[0].flow_run_id is None
    ledger.record_run("rev1", 1, "run-1", "s3://out/rev1/x")
    assert ledger.attempts("rev1")[0].flow_run_id == "run-1" and ledger.revisions() == ["rev1"]


def test_the_ledger_says_which_source_format_changed_into_which(tmp_path):
    """The source format is recorded with a revision's first claim; the last one claimed before a new revision is
    what it is compared with. An upstream requant cannot read is recorded with the reason."""
    ledger = Ledger(str(tmp_path / "ledger"))
    assert ledger.last_source("a") is None
    ledger.claim("a", 1, "w", source="int4")
    ledger.claim("b", 1, "w", source="mxfp4")
    ledger.claim("b", 2, "w", source=None)  # a retry records nothing new
    assert (ledger.source("a"), ledger.source("b"), ledger.source("c")) == ("int4", "mxfp4", None)
    assert ledger.last_source("c") == "mxfp4" and ledger.last_source("b") == "int4"
    assert source_change("mxfp4", "fp8-block") == "source format mxfp4 -> fp8-block"
    assert source_change("int4", "int4") is None and source_change(None, "int4") is None
    upstream = synthesize(tmp_path / "up", "kimi-mxfp4", progress=False)
    assert declared_source(str(upstream)) == "mxfp4"
    config = json.loads((upstream / "config.json").read_text())
    config["text_config"]["quantization_config"] = {"quant_method": "awq"}
    (upstream / "config.json").write_text(json.dumps(config))
    assert declared_source(str(upstream)).startswith("unreadable (") and "'awq'" in declared_source(str(upstream))


def _attempt(n, run="r", claimed=0.0):
    return Attempt("rev", n, claimed, "w", run and f"{run}{n}")


@pytest.mark.parametrize("attempts,states,expected", [
    ([], {}, ("submit", 1)),
    ([_attempt(1)], {"r1": "COMPLETED"}, ("done", 1)),
    ([_attempt(1)], {"r1": "RUNNING"}, ("wait", 1)),
    ([_attempt(1)], {"r1": "SCHEDULED"}, ("wait", 1)),
    ([_attempt(1)], {"r1": "FAILED"}, ("submit", 2)),
    ([_attempt(1)], {"r1": "CRASHED"}, ("submit", 2)),
    ([_attempt(1)], {}, ("submit", 2)),                                  # the run was deleted
    ([_attempt(1), _attempt(2), _attempt(3)], {"r3": "FAILED"}, ("give-up", 3)),
    ([_attempt(1, run=None, claimed=990.0)], {}, ("wait", 1)),           # claimed 10 s ago, run not recorded yet
    ([_attempt(1, run=None, claimed=0.0)], {}, ("submit", 2)),           # the claiming watcher died
])
def test_decision_table(attempts, states, expected):
    d = decide(attempts, states, max_attempts=3, now=1000.0, claim_timeout_s=600)
    assert (d.action, d.attempt) == expected and d.reason



# --- the content fingerprint: what makes a revision "weights unchanged" ------------------------------------------
# Beside the tiny upstream's own files (weights, index, config.json, generation and preprocessor configs,
# tokenizer.json, tokenizer_config.json, remote code, LICENSE, README.md): the other kinds of files the plan copies
# into the output byte for byte, and documentation.
EXTRA_FILES = {
    "merges.txt": b"#version: 0.2\n\xc4\xa0 t\nh e\n",
    "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
    "tiktoken.model": b"IQ== 0\nIg== 1\n",
    "qwen.tiktoken": b"IQ== 0\nIw== 1\n",
    "spiece.model": b"\n\x05hello\x15\x00\x00\x80?",
    "special_tokens_map.json": b'{"bos_token": "[BOS]", "eos_token": "[EOS]"}',
    "chat_template.jinja": b"{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}",
    "tokenization_kimi.py": b"class TikTokenTokenizer:\n    pad = 0  # the padding id\n",
    "docs/deploy_guidance.md": b"# Deploying\n\nUse vLLM.\n",
    "figures/benchmark.png": b"\x89PNG\r\n\x1a\n0000",
    ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
}
SHARD = "model-00001-of-000004.safetensors"
COUNTS = [SHARD, "model.safetensors.index.json", "config.json", "generation_config.json", "preprocessor_config.json",
          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt", "vocab.txt",
          "tiktoken.model", "qwen.tiktoken", "spiece.model", "chat_template.jinja", "configuration_kimi_k25.py",
          "tokenization_kimi.py", "LICENSE"]
DOCUMENTATION = ["README.md", "docs/deploy_guidance.md", "figures/benchmark.png", ".gitattributes"]


@pytest.fixture(scope="module")
def hub_snapshot(local_hub, tiny_upstream):
    """``testorg/fingerprint`` on the local Hub (which publishes the sha256 of weight files): the tiny upstream plus
    EXTRA_FILES; ``commit`` is that revision and ``change(files)`` commits ``files`` on top of it (a branch of its
    own each time) and returns the ``hf://`` snapshot of the new revision."""
    from types import SimpleNamespace

    from requant.testing.hubserver import publish, publish_dir, set_ref

    repo = "testorg/fingerprint"
    publish_dir(local_hub.root, repo, tiny_upstream)
    commit = publish(local_hub.root, repo, EXTRA_FILES)
    branches = iter(range(10**6))

    def change(files: dict[str, bytes]) -> str:
        branch = f"change-{next(branches)}"
        set_ref(local_hub.root, repo, branch, commit)
        return f"hf://{repo}@{publish(local_hub.root, repo, files, branch=branch)}"

    def read(name: str) -> bytes:
        return EXTRA_FILES[name] if name in EXTRA_FILES else (tiny_upstream / name).read_bytes()

    return SimpleNamespace(repo=repo, commit=commit, snapshot=f"hf://{repo}@{commit}", change=change, read=read,
                           hub=local_hub)


def test_the_tests_cover_every_file_the_plan_reads_or_copies(hub_snapshot):
    from requant.io.storage import open_storage
    from requant.planning import build_plan
    from requant.recipe import load_recipe

    storage = open_storage(hub_snapshot.snapshot)
    plan = build_plan(storage, load_recipe("kimi-k2.6-mxfp4"))
    assert set(plan.extra_files) | {"config.json", "model.safetensors.index.json", SHARD} <= set(COUNTS + DOCUMENTATION)
    assert set(COUNTS + DOCUMENTATION) <= set(storage.list_files())


def _semantic_change(name: str, data: bytes) -> bytes:
    if name.endswith(".json"):
        return json.dumps({**json.loads(data), "requant_test_change": 1}).encode()
    if name.endswith(".py"):
        return data + b"\nREQUANT_TEST_CHANGE = 1\n"
    return data + b"\n"


@pytest.mark.parametrize("name", COUNTS)
def test_a_change_to_a_file_the_output_depends_on_changes_the_fingerprint(hub_snapshot, name):
    before = content_fingerprint(hub_snapshot.snapshot)
    assert before is not None
    changed = hub_snapshot.change({name: _semantic_change(name, hub_snapshot.read(name))})
    assert content_fingerprint(changed) != before, f"a change to {name} left the fingerprint as it was"


@pytest.mark.parametrize("name", DOCUMENTATION)
def test_a_documentation_change_keeps_the_fingerprint(hub_snapshot, name):
    assert is_documentation(name)
    changed = hub_snapshot.change({name: hub_snapshot.read(name) + b"\nA corrected typo.\n"})
    assert content_fingerprint(changed) == content_fingerprint(hub_snapshot.snapshot)


def test_a_reflowed_json_and_a_comment_in_the_code_keep_the_fingerprint(hub_snapshot):
    config = json.loads(hub_snapshot.read("config.json"))
    reflowed = json.dumps(dict(reversed(config.items())), indent=1).encode()
    assert reflowed != hub_snapshot.read("config.json")
    code = hub_snapshot.read("configuration_kimi_k25.py")
    changed = hub_snapshot.change({"config.json": reflowed, "configuration_kimi_k25.py": b"# a new comment\n" + code,
                                   "tokenization_kimi.py": hub_snapshot.read("tokenization_kimi.py").replace(
                                       b"  # the padding id", b"  # the id of padding")})
    assert content_fingerprint(changed) == content_fingerprint(hub_snapshot.snapshot)


def test_the_fingerprint_takes_weights_by_their_published_sha256_without_reading_them(hub_snapshot):
    seen = len(hub_snapshot.hub.server.requests)
    assert content_fingerprint(hub_snapshot.snapshot)
    read = [r.path for r in hub_snapshot.hub.server.requests[seen:] if r.path.endswith((".safetensors", ".bin"))]
    assert read == []


def test_no_fingerprint_without_published_weight_digests(tiny_upstream, tmp_path):
    assert content_fingerprint(str(tiny_upstream)) is None        # a plain directory publishes no sha256
    assert content_fingerprint(str(tmp_path / "not-there")) is None


def test_the_watchers_run_parameters_merge_the_deployments_group_by_group():
    """A deployment's extra parameters add to the watcher's groups instead of replacing them: an
    ``evaluation`` override leaves ``conversion.revision`` set, a ``conversion`` override keeps the revision."""
    from requant.flows.watch import run_parameters

    params = run_parameters("s3://m/snapshots/abc", "abc", "s3://out/abc/r", "r", "hf://o/m",
                            {"evaluation": {"limit": 50}, "conversion": {"unverified": True}, "progress": False})
    assert params == {"upstream": "s3://m/snapshots/abc", "output": "s3://out/abc/r", "recipe": "r", "progress": False,
                      "conversion": {"revision": "abc", "upstream_id": "hf://o/m", "unverified": True},
                      "evaluation": {"limit": 50}}
    from requant.flows.parameters import Conversion, Evaluation

    assert Conversion(**params["conversion"]).revision == "abc" and Evaluation(**params["evaluation"]).limit == 50
