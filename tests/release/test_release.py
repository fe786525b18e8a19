"""`requant release` through the real huggingface_hub client against the local Hub (requant.testing.hubserver):
a release that downloads and verifies, an identical one that makes no commit, the gate, and every failure of the
issue forced once: each one line, nothing committed, and a rerun that completes in one commit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

import requant
from requant.errors import RequantError
from requant.manifest import MANIFEST_FILE
from requant.release import ReleaseOptions, read_records, release
from requant.testing.evaluations import attach_evaluation
from requant.testing.hubserver import publish, serve_hub

WRITE_TOKEN = "hf_requantWRITEtoken7f3a1"
READ_TOKEN = "hf_requantREADtoken19bd2"


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_upstream) -> Path:
    out = tmp_path_factory.mktemp("converted") / "kimi-k2.6-mxfp4"
    requant.convert(str(tiny_upstream), str(out), "kimi-k2.6-mxfp4", upstream_id="moonshotai/Kimi-K2.6-tiny")
    return out


@pytest.fixture(scope="module")
def passed(converted, tmp_path_factory) -> Path:
    """The tiny conversion with a PASS evaluation attached (a template: tests release copies of it)."""
    out = tmp_path_factory.mktemp("passed") / "kimi-k2.6-mxfp4"
    shutil.copytree(converted, out)
    attach_evaluation(out, "PASS", tmp_path_factory.mktemp("eval"))
    return out


@pytest.fixture
def checkpoint(passed, tmp_path) -> Path:
    out = tmp_path / "checkpoint"
    shutil.copytree(passed, out)
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    with serve_hub(root, write_tokens=[WRITE_TOKEN]) as server:
        yield server


@pytest.fixture(autouse=True)
def hub_env(hub, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("REQUANT_HF_RETRIES", "2")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def api(hub) -> HfApi:
    return HfApi(endpoint=hub.url, token=WRITE_TOKEN)


def commits(hub, repo: str, branch: str = "main") -> list[str]:
    return [c.commit_id for c in api(hub).list_repo_commits(repo, revision=branch)]


def released_manifest(checkpoint: Path, commit: str, hub, repo: str) -> dict:
    path = api(hub).hf_hub_download(repo, MANIFEST_FILE, revision=commit)
    return json.loads(Path(path).read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_release_downloads_as_the_manifest_says_and_verifies(checkpoint, hub, tmp_path):
    result = release(str(checkpoint), "hf://acme/tiny-mxfp4")
    assert result.changed and result.verdict == "PASS" and len(result.commit) == 40
    assert result.url.endswith(result.commit) and result.bytes_sent > 0
    download = Path(snapshot_download("acme/tiny-mxfp4", revision=result.commit, endpoint=hub.url, token=WRITE_TOKEN,
                                      local_dir=tmp_path / "download"))
    manifest = json.loads((download / MANIFEST_FILE).read_text())
    for name, info in manifest["outputs"].items():
        assert sha256(download / name) == info["sha256"], name
    assert manifest["release"] == {"repo": "acme/tiny-mxfp4", "verdict": "PASS", "forced": None}
    requant.verify(str(download))                       # the commit alone verifies: weights, eval files, card
    # the checkpoint's own files are what was released (the card is the release's own rendering)
    for name, info in json.loads((checkpoint / MANIFEST_FILE).read_text())["outputs"].items():
        if name != "README.md":
            assert info == manifest["outputs"][name], name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        card = ModelCard.load(download / "README.md")
    assert card.data.base_model == "moonshotai/Kimi-K2.6-tiny" and card.data.base_model_relation == "quantized"
    assert "acme/tiny-mxfp4" in card.text
    record = read_records(requant.open_storage(str(checkpoint)))[-1]
    assert (record.commit, record.url, record.refused) == (result.commit, result.url, None)
    assert not any(WRITE_TOKEN in p.read_text(errors="ignore") for p in download.rglob("*") if p.is_file())

    seen = len(hub.requests)
    again = release(str(checkpoint), "hf://acme/tiny-mxfp4")          # identical: no new commit
    assert not again.changed and again.commit == result.commit
    assert not [r.path for r in hub.requests[seen:] if "/preupload/" in r.path or "/lfs" in r.path]  # nothing sent
    assert commits(hub, "acme/tiny-mxfp4")[0] == result.commit


def test_a_release_replaces_an_earlier_one_and_deletes_its_stale_files(checkpoint, hub, tmp_path):
    first = release(str(checkpoint), "hf://acme/replaced")
    (checkpoint / "eval" / "report.md").unlink()                       # a new evaluation without that file
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    del manifest["outputs"]["eval/report.md"]
    from requant.manifest import sealed_bytes

    (checkpoint / MANIFEST_FILE).write_bytes(sealed_bytes(manifest))
    second = release(str(checkpoint), "hf://acme/replaced")
    assert second.changed and second.deleted == ("eval/report.md",)
    assert commits(hub, "acme/replaced")[:2] == [second.commit, first.commit]
    files = set(api(hub).list_repo_files("acme/replaced", revision=second.commit))
    assert "eval/report.md" not in files and MANIFEST_FILE in files


@pytest.mark.parametrize("verdict", ["FAIL", "INCONCLUSIVE", None])
def test_the_gate_refuses_without_force_and_the_card_says_why_with_it(converted, hub, tmp_path, verdict):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(converted, checkpoint)
    if verdict:
        attach_evaluation(checkpoint, verdict, tmp_path)
    repo = f"acme/gated-{(verdict or 'none').lower()}"
    with pytest.raises(RequantError, match="not released: ") as caught:
        release(str(checkpoint), f"hf://{repo}")
    assert "\n" not in str(caught.value) and "--force" in str(caught.value)
    assert not api(hub).repo_exists(repo)                                # nothing released, not even the repo
    assert read_records(requant.open_storage(str(checkpoint)))[-1].refused

    reason = "shipping for a latency study; quality is tracked separately"
    forced = release(str(checkpoint), f"hf://{repo}", ReleaseOptions(force=reason))
    card = ModelCard.load(api(hub).hf_hub_download(repo, "README.md", revision=forced.commit))
    assert forced.forced == reason and reason in card.text
    assert json.loads(Path(api(hub).hf_hub_download(repo, MANIFEST_FILE, revision=forced.commit)).read_text())[
        "release"]["forced"] == reason


def test_a_pull_request_leaves_the_branch_alone(checkpoint, hub):
    api(hub).create_repo("acme/reviewed", exist_ok=True)
    before = commits(hub, "acme/reviewed")
    result = release(str(checkpoint), "hf://acme/reviewed", ReleaseOptions(create_pr=True))
    assert result.pull_request and commits(hub, "acme/reviewed") == before
    files = api(hub).list_repo_files("acme/reviewed", revision="refs/pr/1")
    assert MANIFEST_FILE in files


def test_a_branch_is_created_and_a_private_repo_stays_private(checkpoint, hub):
    result = release(str(checkpoint), "hf://acme/private-release@v1", ReleaseOptions(private=True))
    assert MANIFEST_FILE in api(hub).list_repo_files("acme/private-release", revision="v1")
    assert MANIFEST_FILE not in api(hub).list_repo_files("acme/private-release", revision="main")
    with pytest.raises(RepositoryNotFoundError):                         # anonymous: not visible
        HfApi(endpoint=hub.url, token=False).model_info("acme/private-release")
    assert result.commit == api(hub).model_info("acme/private-release", revision="v1").sha


@pytest.mark.parametrize("token, status", [(None, "401"), (READ_TOKEN, "403")])
def test_no_or_a_read_only_token_is_one_line_and_nothing_is_created(checkpoint, hub, monkeypatch, token, status):
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", "/nonexistent/token")
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RequantError, match=f"HTTP {status}") as caught:
        release(str(checkpoint), f"hf://acme/refused-{status}")
    assert "\n" not in str(caught.value) and (token or "hf_") not in str(caught.value).replace("HF_TOKEN", "")
    assert not api(hub).repo_exists(f"acme/refused-{status}")


def test_a_repo_holding_another_models_files_is_refused_without_overwrite(checkpoint, hub):
    publish(hub.root, "acme/occupied", {"config.json": b'{"model_type": "llama"}\n', "weights.bin": b"x" * 64})
    head = commits(hub, "acme/occupied")
    with pytest.raises(RequantError, match="another model|no requant release") as caught:
        release(str(checkpoint), "hf://acme/occupied")
    assert "--overwrite" in str(caught.value) and commits(hub, "acme/occupied") == head
    result = release(str(checkpoint), "hf://acme/occupied", ReleaseOptions(overwrite=True))
    files = set(api(hub).list_repo_files("acme/occupied", revision=result.commit))
    assert "weights.bin" not in files and MANIFEST_FILE in files


def test_the_branch_moving_under_the_release_is_refused(checkpoint, hub, monkeypatch):
    """Another commit lands after the release read the head: the Hub refuses the commit (412) and so does the
    release, in one line; run again, it releases on top of the new head."""
    import requant.release.upload as releasing

    release(str(checkpoint), "hf://acme/moving")
    (checkpoint / "eval" / "extra.txt").write_text("a new file\n")    # something to commit next time
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    manifest["outputs"]["eval/extra.txt"] = {"size": 11, "sha256": sha256(checkpoint / "eval" / "extra.txt")}
    from requant.manifest import sealed_bytes

    (checkpoint / MANIFEST_FILE).write_bytes(sealed_bytes(manifest))
    upload = releasing._upload

    def someone_commits_meanwhile(*args, **kwargs):
        sent = upload(*args, **kwargs)
        publish(hub.root, "acme/moving", {"NOTES.md": b"a colleague's commit\n"})
        return sent

    monkeypatch.setattr(releasing, "_upload", someone_commits_meanwhile)
    moved = commits(hub, "acme/moving")
    with pytest.raises(RequantError, match="branch moved") as caught:
        release(str(checkpoint), "hf://acme/moving")
    assert "\n" not in str(caught.value)
    assert len(commits(hub, "acme/moving")) == len(moved) + 1            # only the colleague's commit
    monkeypatch.setattr(releasing, "_upload", upload)
    with pytest.raises(RequantError, match="no requant release|another model"):
        release(str(checkpoint), "hf://acme/moving")                     # NOTES.md is not ours: refused, said


@pytest.mark.parametrize("status", [429, 503])
def test_transient_upload_failures_are_retried(checkpoint, hub, status, tmp_path):
    seen = len(hub.requests)
    hub.fail_next(2, status=status, retry_after=0, path_contains="/lfs-upload/")
    result = release(str(checkpoint), f"hf://acme/flaky-{status}")
    assert result.changed
    assert [r.status for r in hub.requests[seen:] if "/lfs-upload/" in r.path][:3] == [status, status, 200]
    requant.verify(snapshot_download(f"acme/flaky-{status}", revision=result.commit, endpoint=hub.url,
                                     token=WRITE_TOKEN, local_dir=tmp_path / "download"))


def test_an_upload_refused_as_too_large_then_resumed_ends_in_one_commit(checkpoint, hub):
    hub.fail_next(1, status=413, retry_after=None, path_contains="/lfs-upload/")
    with pytest.raises(RequantError, match="HTTP 413.*run the same release again") as caught:
        release(str(checkpoint), "hf://acme/too-large")
    assert "\n" not in str(caught.value)
    before = commits(hub, "acme/too-large")
    result = release(str(checkpoint), "hf://acme/too-large")
    assert commits(hub, "acme/too-large") == [result.commit, *before]


def test_a_release_whose_bytes_differ_from_the_manifest_is_stopped_before_anything_is_committed(checkpoint, hub):
    shard = sorted(checkpoint.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(RequantError, match=f"{shard.name}.*the manifest says") as caught:
        release(str(checkpoint), "hf://acme/corrupt")
    assert "\n" not in str(caught.value)
    assert len(commits(hub, "acme/corrupt")) == 1                        # the repository's initial commit only


def test_a_release_killed_mid_upload_then_rerun_ends_in_exactly_one_commit(checkpoint, hub, tmp_path):
    """The release process killed (SIGKILL) after its first large file reached the Hub: the rerun does not send that
    file again and ends in exactly one commit."""
    repo = "acme/killed"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE_TOKEN}
    seen = len(hub.requests)
    hub.state.delay_uploads = 1.0  # each upload waits a second before answering: time to kill between two
    try:
        proc = subprocess.Popen([sys.executable, "-m", "requant.flows.cli", "release", str(checkpoint), f"hf://{repo}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not _uploads(hub, seen) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        hub.state.delay_uploads = 0.0
    first = _uploads(hub, seen)
    assert first, "no upload reached the Hub before the kill"
    assert len(commits(hub, repo)) == 1                                   # nothing committed
    before = len(hub.requests)
    result = release(str(checkpoint), f"hf://{repo}")
    assert len(commits(hub, repo)) == 2 and commits(hub, repo)[0] == result.commit
    assert not set(first) & set(_uploads(hub, before)), "a file the Hub already held was sent again"


def _uploads(hub, since: int) -> list[str]:
    """The LFS objects whose upload the Hub accepted, from request ``since`` on."""
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests[since:] if r.method == "PUT" and r.status == 200]
