"""The local Hub (requant.testing.hubserver) through the real huggingface_hub client: metadata, downloads, ranges,
the Hub's error codes, gating, and what the client does with injected 429/503 answers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from huggingface_hub import HfApi, HfFileSystem, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from requant.errors import RequantError
from requant.testing.hubserver import publish, serve_hub, set_ref

WEIGHTS = os.urandom(3 << 20)  # LFS by name
V1, V2, NOTES = b'{"version": 1}\n', b'{"version": 2}\n', b"notes\n"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    weights = tmp_path_factory.mktemp("src") / "weights.bin"
    weights.write_bytes(WEIGHTS)
    c1 = publish(root, "org/model", {"config.json": V1, "model.safetensors": weights, "docs/notes.txt": NOTES})
    c2 = publish(root, "org/model", {"config.json": V2}, message="bump config")
    set_ref(root, "org/model", "v1", c1)
    publish(root, "org/gated", {"README.md": b"gated\n", "w.safetensors": WEIGHTS[:4096]})
    (root / "org/gated/repo.json").write_text(json.dumps({"gated": True, "tokens": ["hf_good"]}))
    publish(root, "org/private", {"a.txt": b"a"})
    (root / "org/private/repo.json").write_text(json.dumps({"private": True, "tokens": ["hf_good"]}))
    with serve_hub(root) as server:
        yield SimpleNamespace(server=server, url=server.url, c1=c1, c2=c2, weights=weights,
                              api=HfApi(endpoint=server.url, token=False))


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    return tmp_path / "cache"


def download(hub, cache, filename, repo_id="org/model", token=False, **kwargs) -> bytes:
    return Path(hf_hub_download(repo_id, filename, endpoint=hub.url, cache_dir=cache, token=token, **kwargs)).read_bytes()


def test_metadata_paths_info_and_tree(hub):
    info = hub.api.model_info("org/model", files_metadata=True)
    assert info.sha == hub.c2 and info.gated is False and info.private is False
    files = {s.rfilename: s for s in info.siblings}
    assert {n: s.size for n, s in files.items()} == {"config.json": len(V2), "docs/notes.txt": len(NOTES),
                                                     "model.safetensors": len(WEIGHTS)}
    assert files["config.json"].blob_id == git_blob_id(V2) and files["config.json"].lfs is None
    assert files["model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert files["model.safetensors"].lfs.size == len(WEIGHTS)
    assert hub.api.model_info("org/model", revision="v1").sha == hub.c1
    assert hub.api.model_info("org/model", revision=hub.c1).sha == hub.c1

    infos = hub.api.get_paths_info("org/model", ["config.json", "docs", "missing.txt"], revision="v1")
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "config.json"), ("RepoFolder", "docs")]
    assert infos[0].blob_id == git_blob_id(V1)

    top = {e.path: e for e in hub.api.list_repo_tree("org/model")}
    assert sorted(top) == ["config.json", "docs", "model.safetensors"]
    assert top["model.safetensors"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert sorted(e.path for e in hub.api.list_repo_tree("org/model", recursive=True)) == \
        ["config.json", "docs", "docs/notes.txt", "model.safetensors"]
    assert [e.path for e in hub.api.list_repo_tree("org/model", "docs")] == ["docs/notes.txt"]


def test_downloads_are_byte_exact(hub, hf_env):
    assert download(hub, hf_env, "config.json") == V2
    assert download(hub, hf_env, "config.json", revision=hub.c1) == V1
    assert download(hub, hf_env, "config.json", revision="v1") == V1
    seen = len(hub.server.requests)
    assert download(hub, hf_env, "model.safetensors", revision=hub.c1) == WEIGHTS
    assert hub.weights.stat().st_nlink == 3  # the source file, hard-linked into both commits: never copied
    lfs = [(r.method, r.path.split("/")[1], r.status) for r in hub.server.requests[seen:]]
    assert lfs == [("HEAD", "org", 302), ("GET", "lfs-storage", 200)]  # HEAD not followed: storage is another origin
    folder = Path(snapshot_download("org/model", endpoint=hub.url, cache_dir=hf_env / "snap", token=False))
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == \
        {"config.json": V2, "docs/notes.txt": NOTES, "model.safetensors": WEIGHTS}


def test_file_system_reads_a_middle_range(hub):
    fs = HfFileSystem(endpoint=hub.url, token=False, skip_instance_cache=True)
    seen = len(hub.server.requests)
    with fs.open("org/model/model.safetensors", "rb", block_size=1 << 16) as f:
        f.seek(1_000_000)
        assert f.read(5000) == WEIGHTS[1_000_000:1_005_000]
    ranged = [r for r in hub.server.requests[seen:] if r.path.startswith("/lfs-storage/")]
    assert ranged and all(r.status == 206 and r.range.startswith("bytes=1000000-") for r in ranged)


def test_missing_repo_revision_entry(hub, hf_env):
    with pytest.raises(RepositoryNotFoundError):
        hub.api.model_info("org/nope")
    with pytest.raises(RepositoryNotFoundError):
        hub.api.model_info("org/private")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, hf_env, "config.json", repo_id="org/nope")
    with pytest.raises(RevisionNotFoundError):
        hub.api.model_info("org/model", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        download(hub, hf_env, "config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        download(hub, hf_env, "nope.txt")
    with pytest.raises(EntryNotFoundError):
        list(hub.api.list_repo_tree("org/model", "nope"))
    assert hub.api.model_info("org/private", token="hf_good").sha


def test_gated_repo(hub, hf_env):
    assert hub.api.model_info("org/gated").gated == "auto"  # metadata stays public, as on the Hub
    with pytest.raises(GatedRepoError) as anonymous:
        download(hub, hf_env, "README.md", repo_id="org/gated")
    with pytest.raises(GatedRepoError) as outsider:
        download(hub, hf_env, "README.md", repo_id="org/gated", token="hf_wrong")
    assert (anonymous.value.response.status_code, outsider.value.response.status_code) == (401, 403)
    assert download(hub, hf_env, "README.md", repo_id="org/gated", token="hf_good") == b"gated\n"
    seen = len(hub.server.requests)
    assert download(hub, hf_env, "w.safetensors", repo_id="org/gated", token="hf_good") == WEIGHTS[:4096]
    # the token goes to the Hub, not to the storage origin (the client drops it, as for the Hub's CDN)
    assert [r.authorization for r in hub.server.requests[seen:]] == [True, False]


def test_what_the_client_retries(hub, hf_env):
    hub.server.fail_next(1, 429, retry_after=0, path_contains="/tree/")
    start, seen = time.monotonic(), len(hub.server.requests)
    assert len(list(hub.api.list_repo_tree("org/model"))) == 3  # http_backoff: waits Retry-After + 1 s, retries
    assert [r.status for r in hub.server.requests[seen:]] == [429, 200] and time.monotonic() - start >= 1.0

    hub.server.fail_next(1, 429, retry_after=7, path_contains="/api/models/")
    with pytest.raises(HfHubHTTPError) as limited:  # model_info is a plain GET: no retry
        hub.api.model_info("org/model")
    assert limited.value.response.status_code == 429 and limited.value.response.headers["Retry-After"] == "7"

    hub.server.fail_next(1, 503, retry_after=None, path_contains="/resolve/")
    seen = len(hub.server.requests)
    assert download(hub, hf_env, "config.json", revision="v1") == V1  # HEAD retried at once (not with force_download)
    assert [(r.method, r.status) for r in hub.server.requests[seen:]] == [("HEAD", 503), ("HEAD", 200), ("GET", 200)]


def test_raw_protocol(hub):
    base = f"{hub.url}/org/model/resolve/{hub.c1}"
    head = httpx.head(f"{base}/config.json", headers={"Accept-Encoding": "gzip"})
    assert head.headers["ETag"] == f'"{git_blob_id(V1)}"' and head.headers["X-Repo-Commit"] == hub.c1
    assert int(head.headers["Content-Length"]) == len(V1) and "Content-Encoding" not in head.headers
    tail = httpx.get(f"{base}/config.json", headers={"Range": "bytes=-3"})
    assert (tail.status_code, tail.content, tail.headers["Content-Range"]) == (206, V1[-3:], f"bytes 12-14/{len(V1)}")
    assert httpx.get(f"{base}/config.json", headers={"Range": "bytes=99-"}).status_code == 416
    lfs = httpx.head(f"{base}/model.safetensors")
    assert lfs.status_code == 302 and lfs.headers["X-Linked-Size"] == str(len(WEIGHTS))
    assert lfs.headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert httpx.get(lfs.headers["Location"].split("?")[0]).status_code == 403  # unsigned storage URL
    missing = httpx.head(f"{base}/nope.txt")
    assert (missing.status_code, missing.headers["X-Error-Code"], missing.headers["X-Repo-Commit"]) == \
        (404, "EntryNotFound", hub.c1)


def files(hub, repo: str, commit: str) -> dict[str, RepoFile]:
    return {f.path: f for f in hub.api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(f, RepoFile)}


def test_faults_serve_a_changed_file_under_the_same_commit(hub):
    """What each fault of set_fault changes in the raw protocol; the listing stays the published one."""
    base, sha = f"{hub.url}/org/model/resolve/{hub.c1}", hashlib.sha256(WEIGHTS).hexdigest()

    def fetch(fault: str, path: str = "model.safetensors") -> tuple[httpx.Response, httpx.Response]:
        hub.server.set_fault("org/model", path, fault)
        try:
            return httpx.head(f"{base}/{path}"), httpx.get(f"{base}/{path}", follow_redirects=True)
        finally:
            hub.server.set_fault("org/model", path, None)

    head, body = fetch("bytes")  # the headers as published, one byte 5 from the end changed
    assert head.headers["X-Linked-Etag"] == f'"{sha}"' and len(body.content) == len(WEIGHTS)
    assert [i for i, (a, b) in enumerate(zip(body.content, WEIGHTS)) if a != b] == [len(WEIGHTS) - 5]
    head, body = fetch("size")  # 64 bytes shorter, and the headers say so
    assert head.headers["X-Linked-Size"] == str(len(WEIGHTS) - 64) and body.content == WEIGHTS[:-64]
    head, body = fetch("etag")  # the same bytes under another ETag
    assert head.headers["X-Linked-Etag"] not in (f'"{sha}"', None) and body.content == WEIGHTS
    head, body = fetch("etag", "config.json")
    assert head.headers["ETag"] != f'"{git_blob_id(V1)}"' and body.content == V1
    hub.server.set_fault("org/model", "model.safetensors", "transit", times=1)  # the next body only
    first, second = (httpx.get(f"{base}/model.safetensors", follow_redirects=True) for _ in range(2))
    assert first.history[0].headers["X-Linked-Etag"] == first.headers["ETag"] == f'"{sha}"'  # the headers right
    assert first.content != WEIGHTS
    assert len(first.content) == len(WEIGHTS) and second.content == WEIGHTS
    assert files(hub, "org/model", hub.c1)["model.safetensors"].lfs.sha256 == sha  # listed as published
    with pytest.raises(RequantError, match="set_fault"):
        hub.server.set_fault("org/model", "model.safetensors", "nonsense")


def test_git_only_repos_and_hidden_digests(hub):
    """publish(lfs=False) lists every file by git blob id, as a git-serving mirror; hide_digests lists none."""
    commit = publish(hub.server.root, "org/git-only", {"model.safetensors": WEIGHTS[:4096]}, lfs=False)
    entry = files(hub, "org/git-only", commit)["model.safetensors"]
    assert (entry.lfs, entry.blob_id) == (None, git_blob_id(WEIGHTS[:4096]))
    resolved = httpx.get(f"{hub.url}/org/git-only/resolve/{commit}/model.safetensors")
    assert resolved.status_code == 200 and resolved.content == WEIGHTS[:4096]  # served from git, no redirect
    hub.server.state.hide_digests("org/model")
    try:
        hidden = files(hub, "org/model", hub.c1)
        assert len(hidden) == 3 and all(f.blob_id is None and f.lfs is None for f in hidden.values())
    finally:
        hub.server.state.hide_digests("org/model", False)
    assert all(f.blob_id for f in files(hub, "org/model", hub.c1).values())


def test_hf_endpoint_variable_in_a_fresh_process(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0")
    code = ("import hashlib; from huggingface_hub import HfApi, hf_hub_download as d; from requant.io.hf import HfStorage\n"
            "print(HfApi().model_info('org/model').sha, hashlib.sha256(open(d('org/model', 'model.safetensors'), 'rb')"
            ".read()).hexdigest(), HfStorage('hf://org/model@v1').read_range('model.safetensors', 10, 20).hex())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]  # requant's own HfStorage too: ranged GET through the redirect
    assert out.stdout.split() == [hub.c2, hashlib.sha256(WEIGHTS).hexdigest(), WEIGHTS[10:20].hex()]


def test_publish_rejects_bad_input(tmp_path):
    for repo, files, branch in [("no-slash", {"a": b""}, "main"), ("org/r", {"a": b""}, "../x"),
                                ("org/r", {"a": b"", "a/b": b""}, "main"), ("org/r", {"a": "not bytes"}, "main"),
                                ("org/r", {"../a": b""}, "main"), ("org/r", {"a": tmp_path / "missing"}, "main")]:
        with pytest.raises(RequantError):
            publish(tmp_path, repo, files, branch=branch)
    assert not (tmp_path / "org").exists()  # refused before anything was written
    first = publish(tmp_path, "org/r", {"a": b"1", "b": b"2"})
    second = publish(tmp_path, "org/r", {}, delete=["b"])
    assert first != second and sorted(p.name for p in (tmp_path / "org/r/commits" / second).iterdir()) == ["a"]
    with pytest.raises(RequantError):
        publish(tmp_path, "org/r", {}, delete=["b"])
