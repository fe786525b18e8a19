"""The write side of the local Hub (requant.testing.hubserver) through the real huggingface_hub client: repos,
commits of regular and LFS files (basic and multipart uploads), what the client skips, the 412 of a moved branch,
pull requests and branches, who may write, retried and broken uploads, and bodies that do not hash to their oid.

LFS files go up as open binary files: with hf_xet installed the client sends paths and bytes through Xet, which
the local Hub does not speak, and falls back to the LFS batch API only for ``io.BufferedIOBase`` objects."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from requant.testing.hubserver import GITATTRIBUTES, serve_hub

WRITE, READ = "hf_localWRITEtoken5c1d", "hf_localREADtoken0b7e"
KIB = 1 << 10
THRESHOLD, CHUNK = 1 << 20, 512 * KIB  # multipart above 1 MiB, in parts of 512 KiB


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    with serve_hub(root, multipart_threshold=THRESHOLD, multipart_chunk_size=CHUNK) as server:
        yield server


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # as installed: Xet for paths and bytes
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))


@pytest.fixture
def files(tmp_path):
    """Local files with random bytes, and CommitOperationAdds over them opened (closed at the end)."""
    opened = []

    def make(name: str, size: int, seed: int, prefix: bytes = b"") -> SimpleNamespace:
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(prefix + random.Random(seed).randbytes(size - len(prefix)))
        return SimpleNamespace(path=path, data=path.read_bytes(), sha=hashlib.sha256(path.read_bytes()).hexdigest())

    def add(path_in_repo: str, local: SimpleNamespace) -> CommitOperationAdd:
        opened.append(open(local.path, "rb"))
        return CommitOperationAdd(path_in_repo, opened[-1])

    yield SimpleNamespace(make=make, add=add)
    for f in opened:
        f.close()


@pytest.fixture
def repo(hub, request) -> str:
    repo_id = f"org/{request.node.name.replace('[', '-').rstrip(']')}"
    api(hub).create_repo(repo_id)
    return repo_id


def api(hub, token: str | bool = WRITE) -> HfApi:
    return HfApi(endpoint=hub.url, token=token)


def history(hub, repo: str, revision: str = "main") -> list[str]:
    return [c.commit_id for c in api(hub).list_repo_commits(repo, revision=revision)]


def sent(hub, since: int, method: str = "PUT") -> list[str]:
    """The objects whose upload requests (or parts) reached the Hub from request ``since`` on, by oid."""
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests[since:] if r.method == method
            and r.path.startswith("/lfs-upload/")]


def leftovers(hub, repo: str) -> list[Path]:
    """Anything an upload left beside the stored objects: temp files, parts."""
    store = hub.root / repo / "lfs-objects"
    return [p for p in store.rglob("*") if p.is_file() and p.parent != store]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_a_new_repo_has_main_with_an_initial_commit(hub):
    url = api(hub).create_repo("org/fresh")
    assert url == f"{hub.url}/org/fresh" and url.repo_id == "org/fresh"
    refs = api(hub).list_repo_refs("org/fresh")
    [initial] = api(hub).list_repo_commits("org/fresh")
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [("main", "refs/heads/main", initial.commit_id)]
    assert refs.tags == [] and initial.title == "initial commit"
    assert api(hub).list_repo_files("org/fresh") == [".gitattributes"]
    gitattributes = hf_hub_download("org/fresh", ".gitattributes", endpoint=hub.url, token=WRITE,
                                    cache_dir=hub.root.parent / "cache-fresh")
    assert Path(gitattributes).read_bytes() == GITATTRIBUTES
    with pytest.raises(HfHubHTTPError) as taken:
        api(hub).create_repo("org/fresh")
    assert taken.value.response.status_code == 409
    assert api(hub).create_repo("org/fresh", exist_ok=True) == url  # the 409 names the repo, as the Hub's does
    assert history(hub, "org/fresh") == [initial.commit_id]
    with pytest.raises(BadRequestError):
        api(hub).create_repo("org/data", repo_type="dataset")
    with pytest.raises(BadRequestError):
        api(hub).create_repo("no-organization")  # no users here: a repo needs its ORG
    api(hub).delete_repo("org/fresh")
    assert not api(hub).repo_exists("org/fresh")
    api(hub).delete_repo("org/fresh", missing_ok=True)
    assert api(hub).create_repo("org/fresh") == url and len(history(hub, "org/fresh")) == 1


def test_a_private_repo_reads_only_with_a_token(hub, tmp_path):
    api(hub).create_repo("org/secret", private=True)
    assert api(hub).model_info("org/secret").private is True
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        api(hub, False).model_info("org/secret")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/secret", ".gitattributes", endpoint=hub.url, token=False, cache_dir=tmp_path)
    assert api(hub, False).model_info("org/secret", token=WRITE).sha  # a write token reads it


def test_regular_and_lfs_files_committed_then_downloaded_and_listed(hub, repo, files, tmp_path):
    config = b'{"model_type": "llama"}\n'
    small = files.make("small.safetensors", 300 * KIB, 1)            # LFS by name: one PUT
    large = files.make("large.bin", THRESHOLD + 300 * KIB, 2)        # over the threshold: 3 parts, then completion
    table = files.make("table.dat", 2 * KIB, 3, prefix=b"\0\1")      # LFS by its binary sample
    seen = len(hub.requests)
    info = api(hub).create_commit(repo, [CommitOperationAdd("config.json", config),
                                         files.add("weights/small.safetensors", small),
                                         files.add("weights/large.bin", large), files.add("table.dat", table)],
                                  commit_message="add weights", commit_description="the tiny model")
    assert info.oid == api(hub).model_info(repo).sha and info.commit_url == f"{hub.url}/{repo}/commit/{info.oid}"
    assert Counter(sent(hub, seen)) == {small.sha: 1, large.sha: 3, table.sha: 1}
    assert sent(hub, seen, "POST") == [large.sha]                      # the multipart completion
    stored = {p.name for p in (hub.root / repo / "lfs-objects").iterdir() if p.is_file()}
    assert stored == {small.sha, large.sha, table.sha} and leftovers(hub, repo) == []

    folder = Path(snapshot_download(repo, revision=info.oid, endpoint=hub.url, token=WRITE, cache_dir=tmp_path / "c"))
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == {
        ".gitattributes": GITATTRIBUTES, "config.json": config, "weights/small.safetensors": small.data,
        "weights/large.bin": large.data, "table.dat": table.data}
    lfs = {"weights/small.safetensors": small, "weights/large.bin": large, "table.dat": table}
    listed = {"paths-info": {i.path: i for i in api(hub).get_paths_info(repo, ["config.json", *lfs], expand=True)},
              "tree": {e.path: e for e in api(hub).list_repo_tree(repo, recursive=True, expand=True)
                       if isinstance(e, RepoFile)}}
    for how, entries in listed.items():
        assert entries["config.json"].lfs is None and entries["config.json"].blob_id == git_blob_id(config), how
        for path, local in lfs.items():
            assert (entries[path].size, entries[path].lfs.size, entries[path].lfs.sha256) == \
                (len(local.data), len(local.data), local.sha), (how, path)
    latest, initial = api(hub).list_repo_commits(repo)
    assert (latest.commit_id, latest.title, latest.message) == (info.oid, "add weights", "the tiny model")
    assert initial.title == "initial commit" and latest.created_at >= initial.created_at


def test_what_did_not_change_is_not_sent_and_makes_no_commit(hub, repo, files):
    weights = files.make("w.safetensors", 200 * KIB, 4)
    first = api(hub).create_commit(repo, [CommitOperationAdd("config.json", b"1\n"), files.add("w.safetensors", weights)],
                                   commit_message="first")
    before, seen = history(hub, repo), len(hub.requests)
    again = api(hub).create_commit(repo, [CommitOperationAdd("config.json", b"1\n"),
                                          files.add("w.safetensors", weights)], commit_message="again")
    # preupload names each file's oid (git blob id, or sha256 for LFS); equal to the client's own: dropped, and the
    # client skips the empty commit, answering with the head
    assert again.oid == first.oid and history(hub, repo) == before
    assert sent(hub, seen) == [] and not [r for r in hub.requests[seen:] if "/commit/" in r.path]
    one = api(hub).create_commit(repo, [CommitOperationAdd("config.json", b"2\n"), files.add("w.safetensors", weights)],
                                 commit_message="one changed")
    assert history(hub, repo) == [one.oid, *before] and sent(hub, seen) == []


def test_an_object_uploaded_but_not_committed_is_not_sent_again(hub, repo, files, tmp_path):
    weights = files.make("w.bin", THRESHOLD + 100 * KIB, 5)
    seen = len(hub.requests)
    api(hub).preupload_lfs_files(repo, additions=[files.add("w.bin", weights)])  # uploaded, as by an interrupted run
    assert sent(hub, seen) == [weights.sha] * 3 and len(history(hub, repo)) == 1
    assert (hub.root / repo / "lfs-objects" / weights.sha).is_file()
    seen = len(hub.requests)
    info = api(hub).create_commit(repo, [files.add("w.bin", weights)], commit_message="commit what was uploaded")
    assert sent(hub, seen) == [] and len(history(hub, repo)) == 2
    assert Path(hf_hub_download(repo, "w.bin", revision=info.oid, endpoint=hub.url, token=WRITE,
                                cache_dir=tmp_path)).read_bytes() == weights.data


def test_a_commit_on_a_moved_branch_is_refused_with_412(hub, repo):
    head = api(hub).model_info(repo).sha
    first = api(hub).create_commit(repo, [CommitOperationAdd("a.txt", b"a")], commit_message="a", parent_commit=head)
    short = api(hub).create_commit(repo, [CommitOperationAdd("b.txt", b"b")], commit_message="b",
                                   parent_commit=first.oid[:7])  # the client allows a short id
    with pytest.raises(HfHubHTTPError) as raced:
        api(hub).create_commit(repo, [CommitOperationAdd("c.txt", b"c")], commit_message="c", parent_commit=first.oid)
    assert type(raced.value) is HfHubHTTPError and raced.value.response.status_code == 412
    assert "A commit has happened since. Please refresh and try again." in str(raced.value)
    assert history(hub, repo) == [short.oid, first.oid, head]


def test_a_pull_request_leaves_the_branch_alone(hub, repo, files, tmp_path):
    main = api(hub).model_info(repo).sha
    weights = files.make("w.safetensors", 100 * KIB, 6)
    card = b"---\nlicense: mit\n---\n# a card\n"  # a README.md makes the client validate its metadata first
    pr = api(hub).create_commit(repo, [CommitOperationAdd("README.md", card), files.add("w.safetensors", weights)],
                                commit_message="proposal", create_pr=True)
    assert (pr.pr_revision, pr.pr_num, pr.pr_url) == ("refs/pr/1", 1, f"{hub.url}/{repo}/discussions/1")
    assert api(hub).model_info(repo).sha == main and history(hub, repo) == [main]
    assert api(hub).model_info(repo, revision="refs/pr/1").sha == pr.oid  # the client quotes it: refs%2Fpr%2F1
    assert api(hub).list_repo_files(repo, revision="refs/pr/1") == [".gitattributes", "README.md", "w.safetensors"]
    [entry] = api(hub).get_paths_info(repo, ["w.safetensors"], revision="refs/pr/1")
    assert entry.lfs.sha256 == weights.sha
    assert Path(hf_hub_download(repo, "w.safetensors", revision="refs/pr/1", endpoint=hub.url, token=WRITE,
                                cache_dir=tmp_path)).read_bytes() == weights.data
    more = api(hub).create_commit(repo, [CommitOperationAdd("notes.txt", b"n\n")], commit_message="more",
                                  revision="refs/pr/1")
    assert history(hub, repo, "refs/pr/1") == [more.oid, pr.oid, main]
    second = api(hub).create_commit(repo, [CommitOperationAdd("other.txt", b"o\n")], commit_message="another",
                                    create_pr=True)
    assert second.pr_revision == "refs/pr/2" and api(hub).model_info(repo).sha == main
    refs = api(hub).list_repo_refs(repo, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", more.oid), ("refs/pr/2", second.oid)]
    assert [b.name for b in refs.branches] == ["main"]
    with pytest.raises(ValueError, match="Invalid metadata"):
        api(hub).create_commit(repo, [CommitOperationAdd("README.md", b"---\n[unclosed\n---\n")], commit_message="x")


def test_branches(hub, repo):
    head = api(hub).model_info(repo).sha
    api(hub).create_branch(repo, branch="dev")
    on_dev = api(hub).create_commit(repo, [CommitOperationAdd("dev.txt", b"d")], commit_message="dev", revision="dev")
    assert history(hub, repo, "dev") == [on_dev.oid, head] and history(hub, repo) == [head]
    with pytest.raises(HfHubHTTPError) as exists:
        api(hub).create_branch(repo, branch="dev")
    assert exists.value.response.status_code == 409
    api(hub).create_branch(repo, branch="dev", exist_ok=True)
    api(hub).create_branch(repo, branch="from-dev", revision=on_dev.oid)
    assert api(hub).model_info(repo, revision="from-dev").sha == on_dev.oid
    with pytest.raises(RevisionNotFoundError):
        api(hub).create_branch(repo, branch="nowhere", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api(hub).create_commit(repo, [CommitOperationAdd("x.txt", b"x")], commit_message="x", revision="no-such")
    api(hub).delete_branch(repo, branch="dev")
    assert sorted(b.name for b in api(hub).list_repo_refs(repo).branches) == ["from-dev", "main"]
    with pytest.raises(RevisionNotFoundError):
        api(hub).delete_branch(repo, branch="dev")


def test_deleting_files_and_folders(hub, repo):
    api(hub).create_commit(repo, [CommitOperationAdd(p, p.encode()) for p in ("docs/a.md", "docs/b/c.md", "keep.txt",
                                                                                "gone.txt")], commit_message="add")
    api(hub).create_commit(repo, [CommitOperationDelete("docs/"), CommitOperationDelete("gone.txt")],
                           commit_message="remove")
    assert api(hub).list_repo_files(repo) == [".gitattributes", "keep.txt"]
    before = history(hub, repo)
    with pytest.raises(RemoteEntryNotFoundError):
        api(hub).create_commit(repo, [CommitOperationDelete("nope.txt")], commit_message="x")
    assert history(hub, repo) == before


def test_every_write_needs_a_token(hub, repo):
    writes = [("POST", "/api/repos/create", {"organization": "org", "name": "x"}),
              ("DELETE", "/api/repos/delete", {"organization": "org", "name": repo.split("/")[1]}),
              ("POST", f"/api/models/{repo}/preupload/main", {"files": []}),
              ("POST", f"/api/models/{repo}/commit/main", {"key": "header", "value": {"summary": "x"}}),
              ("POST", f"/{repo}.git/info/lfs/objects/batch", {"operation": "upload", "objects": []}),
              ("POST", f"/{repo}.git/info/lfs/objects/verify", {"oid": "0" * 64, "size": 1}),
              ("POST", f"/api/models/{repo}/branch/x", {}), ("DELETE", f"/api/models/{repo}/branch/main", None)]
    for method, path, body in writes:
        for headers, status in (({}, 401), ({"Authorization": "Bearer not-a-hub-token"}, 401)):
            answer = httpx.request(method, hub.url + path, json=body, headers=headers)
            assert answer.status_code == status, (method, path, headers)
    with pytest.raises(HfHubHTTPError) as anonymous:
        api(hub, False).create_commit(repo, [CommitOperationAdd("a.txt", b"a")], commit_message="x")
    assert anonymous.value.response.status_code == 401 and len(history(hub, repo)) == 1


def test_only_the_write_tokens_write_when_they_are_listed(tmp_path):
    with serve_hub(tmp_path / "hub", write_tokens=[WRITE]) as server:
        api(server).create_repo("org/r")
        for attempt in (lambda a: a.create_repo("org/other"),
                        lambda a: a.create_commit("org/r", [CommitOperationAdd("a.txt", b"a")], commit_message="x"),
                        lambda a: a.create_branch("org/r", branch="b")):
            with pytest.raises(HfHubHTTPError) as refused:
                attempt(api(server, READ))
            assert refused.value.response.status_code == 403 and "read-only" in str(refused.value)
        assert not api(server).repo_exists("org/other") and len(history(server, "org/r")) == 1
        api(server).create_repo("org/p", private=True)
        with pytest.raises(RepositoryNotFoundError):
            api(server, READ).model_info("org/p")  # neither listed for the repo nor a write token
        (server.root / "org/p/repo.json").write_text(json.dumps({"private": True, "tokens": [READ]}))
        assert api(server, READ).model_info("org/p").private is True
        api(server).create_commit("org/r", [CommitOperationAdd("a.txt", b"a")], commit_message="a")
        stored = [p for p in server.root.rglob("*") if p.is_file()]
    assert stored and not [p for p in stored if WRITE.encode() in p.read_bytes()]  # no token kept anywhere


def test_transient_upload_failures_are_retried_and_a_413_is_not(hub, repo, files):
    whole, parted = files.make("whole.safetensors", 200 * KIB, 7), files.make("parted.bin", THRESHOLD + KIB, 8)
    hub.fail_next(1, 429, retry_after=0, path_contains=whole.sha)
    hub.fail_next(1, 503, retry_after=None, path_contains=parted.sha)
    seen = len(hub.requests)
    api(hub).create_commit(repo, [files.add("whole.safetensors", whole), files.add("parted.bin", parted)],
                           commit_message="despite the Hub")
    statuses = [(r.path.rsplit("/", 1)[-1], r.status) for r in hub.requests[seen:] if r.method == "PUT"]
    assert [s for oid, s in statuses if oid == whole.sha] == [429, 200]
    assert [s for oid, s in statuses if oid == parted.sha] == [503, 200, 200, 200]
    assert leftovers(hub, repo) == [] and len(history(hub, repo)) == 2

    big = files.make("big.safetensors", 64 * KIB, 9)
    hub.fail_next(1, 413, retry_after=None, path_contains=big.sha)
    with pytest.raises(RuntimeError) as refused:  # the client wraps an upload's error
        api(hub).create_commit(repo, [files.add("big.safetensors", big)], commit_message="too large")
    assert refused.value.__cause__.response.status_code == 413 and len(history(hub, repo)) == 2
    api(hub).create_commit(repo, [files.add("big.safetensors", big)], commit_message="run again")
    assert len(history(hub, repo)) == 3


def test_a_connection_cut_mid_upload_stores_nothing_and_the_client_retries(hub, repo, files):
    weights = files.make("w.safetensors", 300 * KIB, 10)
    hub.cut_uploads(1, after_bytes=64 * KIB)
    seen = len(hub.requests)
    info = api(hub).create_commit(repo, [files.add("w.safetensors", weights)], commit_message="after a cut")
    assert [r.status for r in hub.requests[seen:] if r.method == "PUT"] == [500, 200]  # 500: the started answer
    assert leftovers(hub, repo) == [] and api(hub).model_info(repo).sha == info.oid


def test_the_upload_protocol_raw(hub, repo, files):
    """Batch, a cut upload, a wrong body, a good one, verify; and a commit naming an object never uploaded."""
    auth = {"Authorization": f"Bearer {WRITE}"}
    weights = files.make("w.bin", 100 * KIB, 11)
    batch = httpx.post(f"{hub.url}/{repo}.git/info/lfs/objects/batch", headers=auth, json={
        "operation": "upload", "transfers": ["basic", "multipart"], "hash_algo": "sha256",
        "objects": [{"oid": weights.sha, "size": len(weights.data)}, {"oid": "bad", "size": 1}]}).json()
    [ok, bad] = batch["objects"]
    assert bad["error"]["code"] == 422 and set(ok["actions"]) == {"upload", "verify"}
    href, verify = ok["actions"]["upload"]["href"], ok["actions"]["verify"]["href"]
    assert href.startswith(hub.storage_url) and "header" not in ok["actions"]["upload"]  # basic: no chunk_size

    def verified() -> int:
        return httpx.post(verify, headers=auth, json={"oid": weights.sha, "size": len(weights.data)}).status_code

    hub.cut_uploads(1, after_bytes=10 * KIB)
    with pytest.raises(httpx.TransportError):
        httpx.put(href, content=weights.data)
    assert verified() == 404 and leftovers(hub, repo) == []
    assert httpx.put(href.split("?")[0] + "?size=1&chunk=0&sig=x", content=b"x").status_code == 403
    wrong = httpx.put(href, content=weights.data[::-1])
    assert wrong.status_code == 400 and "sha256 mismatch" in wrong.json()["error"]
    short = httpx.put(href, content=weights.data[:-1])
    assert short.status_code == 400 and "size mismatch" in short.json()["error"]
    assert verified() == 404 and leftovers(hub, repo) == []
    put = httpx.put(href, content=weights.data)
    assert put.status_code == 200 and verified() == 200
    again = httpx.post(f"{hub.url}/{repo}.git/info/lfs/objects/batch", headers=auth, json={
        "operation": "upload", "objects": [{"oid": weights.sha, "size": len(weights.data)}]}).json()
    assert again["objects"] == [{"oid": weights.sha, "size": len(weights.data)}]  # held: nothing to do

    never = hashlib.sha256(b"never uploaded").hexdigest()
    lines = [{"key": "header", "value": {"summary": "x"}},
             {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": never, "size": 14}}]
    commit = httpx.post(f"{hub.url}/api/models/{repo}/commit/main", headers=auth,
                        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert commit.status_code == 400 and "never uploaded" in commit.json()["error"]
    lines[1]["value"].update(oid=weights.sha, size=len(weights.data))
    lines.append({"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"a").decode(),
                                           "encoding": "base64"}})
    commit = httpx.post(f"{hub.url}/api/models/{repo}/commit/main", headers=auth,
                        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert commit.status_code == 200 and api(hub).model_info(repo).sha == commit.json()["commitOid"]


def test_a_body_that_does_not_hash_to_its_oid_is_refused(hub, repo, files):
    weights = files.make("w.safetensors", 100 * KIB, 12)
    op = files.add("w.safetensors", weights)  # hashed now
    weights.path.write_bytes(bytes(b ^ 1 for b in weights.data))  # then changed under the open file, same size
    with pytest.raises(RuntimeError) as refused:
        api(hub).create_commit(repo, [op], commit_message="changed meanwhile")
    cause = refused.value.__cause__
    assert isinstance(cause, BadRequestError) and "sha256 mismatch" in str(cause)
    assert not (hub.root / repo / "lfs-objects" / weights.sha).exists() and leftovers(hub, repo) == []
    assert len(history(hub, repo)) == 1


def test_lfs_bytes_and_paths_need_xet_off(hub, repo, monkeypatch, tmp_path):
    """With hf_xet on, bytes and paths go through Xet: the local Hub refuses its token call, nothing is committed.
    With HF_HUB_DISABLE_XET they go over the LFS batch API like file objects."""
    data = random.Random(13).randbytes(100 * KIB)
    seen = len(hub.requests)
    with pytest.raises(Exception):  # noqa: B017 - hf_xet's own error type
        api(hub).create_commit(repo, [CommitOperationAdd("w.safetensors", data)], commit_message="via xet")
    assert [(r.path, r.status) for r in hub.requests[seen:] if "/xet-" in r.path] == \
        [(f"/api/models/{repo}/xet-write-token/main", 404)]
    assert len(history(hub, repo)) == 1
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    api(hub).create_commit(repo, [CommitOperationAdd("w.safetensors", data)], commit_message="over LFS")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(data[:1000])
    (folder / "notes.txt").write_text("notes\n")
    api(hub).upload_folder(repo_id=repo, folder_path=folder, commit_message="a folder")
    api(hub).upload_file(repo_id=repo, path_or_fileobj=b"one file\n", path_in_repo="one.txt")
    assert api(hub).list_repo_files(repo) == [".gitattributes", "notes.txt", "one.txt", "sub/x.bin", "w.safetensors"]
    assert len(history(hub, repo)) == 4


def test_hub_serve_passes_its_write_tokens(monkeypatch, tmp_path):
    from requant.cli import build_parser
    from requant.testing import hubserver

    args = build_parser().parse_args(["hub", "serve", str(tmp_path), "--write-token", WRITE, "--write-token", READ])
    assert args.write_token == [WRITE, READ]
    assert build_parser().parse_args(["hub", "serve", str(tmp_path)]).write_token is None
    seen = {}

    def fake_serve(root, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # instead of serving until Ctrl-C

    monkeypatch.setattr(hubserver, "serve_hub", fake_serve)
    with pytest.raises(KeyboardInterrupt):
        args.run(args)
    assert seen["write_tokens"] == [WRITE, READ]
