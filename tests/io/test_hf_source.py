"""``hf://`` upstreams through the real huggingface_hub client against the local Hub (requant.testing.hubserver):
conversions equal the directory's, pinned revisions, range reads (also from a server that ignores Range), and
every failure a user meets as one line with a non-zero exit and nothing at the destination."""

from __future__ import annotations

import json
import re
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

import requant
from requant.cli import main
from requant.errors import CheckpointError
from requant.io.hf import HfStorage, resolve_revision
from requant.manifest import MANIFEST_FILE
from requant.run import ConvertSummary
from requant.testing.hubserver import publish, publish_dir

RECIPE = "kimi-k2.6-mxfp4"


@pytest.fixture(scope="module")
def from_directory(tmp_path_factory, tiny_upstream) -> Path:
    out = tmp_path_factory.mktemp("dir") / "mx"
    requant.convert(str(tiny_upstream), str(out), RECIPE, progress=False)
    return out


def _shards(out: Path) -> dict[str, bytes]:
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    return {f: (out / f).read_bytes() for f in manifest["outputs"] if f.endswith(".safetensors")}


def _cli(capsys, *argv) -> tuple[int, str]:
    """Exit status and what stderr said besides progress bars (which must be all else it printed)."""
    rc = main(list(argv))
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err)
             if line.strip() and "%|" not in line and not re.search(r" \[\d\d:\d\d", line)]
    return rc, "\n".join(lines)


def test_convert_from_the_hub_equals_the_directory_and_pins_the_commit(local_hub, from_directory, tmp_path):
    seen = len(local_hub.server.requests)
    out = tmp_path / "mx"
    manifest = requant.convert("hf://testorg/gated@main", str(out), RECIPE, progress=False, jobs=1).manifest
    assert _shards(out) == _shards(from_directory)
    for name in ("config.json", "model.safetensors.index.json"):
        assert (out / name).read_bytes() == (from_directory / name).read_bytes(), name
    commit = local_hub.commits["gated"]
    assert manifest["upstream"] | {"run_key": None} == {"uri": f"hf://testorg/gated@{commit}", "id": "testorg/gated",
                                                        "revision": commit, "run_key": None}
    shards = manifest["inputs"]["shards"]
    assert shards and all(d["verified_against_published"] for d in shards.values())  # LFS sha256 matched
    assert manifest["inputs"]["files"]["config.json"]["verified_against_published"]  # git file: its blob id matched
    assert "unverified_inputs" not in manifest and "Unverified" not in (out / "README.md").read_text()
    # the token never lands in what a run leaves behind
    assert not [p for p in out.rglob("*") if p.is_file() and local_hub.token.encode() in p.read_bytes()]

    requests = local_hub.server.requests[seen:]
    storage = [r for r in requests if r.path.startswith("/lfs-storage/")]
    whole = [r for r in storage if r.method == "GET" and r.range is None]
    assert len(whole) == len(shards)  # each shard read whole once, to check its sha256; jobs read ranges only
    assert sum(1 for r in storage if r.range and r.status == 206) >= 2 * len(shards)
    assert not [r for r in storage if r.authorization]  # the token stays on the Hub's origin
    assert all(r.authorization for r in requests if "/resolve/" in r.path)


def test_a_moving_branch_does_not_change_a_pinned_read(local_hub, tiny_upstream):
    first = publish_dir(local_hub.root, "testorg/moving", tiny_upstream)
    storage = HfStorage("hf://testorg/moving@main")
    assert storage.commit == first
    old = storage.read_bytes("config.json")
    second = publish(local_hub.root, "testorg/moving", {"config.json": b'{"moved": true}\n'}, message="move")
    assert resolve_revision("testorg/moving", "main") == second
    assert storage.read_bytes("config.json") == old == (tiny_upstream / "config.json").read_bytes()
    assert HfStorage(storage.pinned_uri()).read_bytes("config.json") == old


def test_a_server_that_ignores_range_is_read_correctly(local_hub, tiny_upstream):
    storage = HfStorage(f"hf://testorg/tiny@{local_hub.commits['tiny']}")
    shard = sorted(f for f in storage.list_files() if f.endswith(".safetensors"))[-1]
    data = (tiny_upstream / shard).read_bytes()
    local_hub.server.state.ignore_ranges = True
    try:
        seen = len(local_hub.server.requests)
        assert storage.read_range(shard, 1000, 5000) == data[1000:5000]
        buf = bytearray(len(data) - 17)
        storage.read_into(shard, 17, buf)
        assert bytes(buf) == data[17:]
        ranged = [r for r in local_hub.server.requests[seen:] if r.range and r.path.startswith("/lfs-storage/")]
        assert ranged and all(r.status == 200 for r in ranged)  # answered with the whole file each time
    finally:
        local_hub.server.state.ignore_ranges = False


def test_rate_limits_are_waited_out(local_hub, monkeypatch):
    monkeypatch.setenv("REQUANT_HF_RETRIES", "3")
    storage = HfStorage(f"hf://testorg/tiny@{local_hub.commits['tiny']}")
    seen = len(local_hub.server.requests)
    local_hub.server.fail_next(2, 429, retry_after=0, path_contains="/resolve/")
    assert json.loads(storage.read_bytes("config.json"))
    statuses = [r.status for r in local_hub.server.requests[seen:] if "/resolve/" in r.path]
    assert statuses == [429, 429, 200]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case, uri, env, expected", [
    ("unknown repo", "hf://testorg/nope@main", {}, "no such repository"),
    ("unknown revision", "hf://testorg/tiny@v9", {}, "no such revision"),
    ("gated without a token", "hf://testorg/gated@main", {"HF_TOKEN": None}, "set HF_TOKEN"),
    ("token refused", "hf://testorg/gated@main", {"HF_TOKEN": "hf_someone_else"}, "HF_TOKEN was refused"),
    ("server errors", "hf://testorg/tiny@main", {"fail": 503}, "HTTP 503 after 1 retries"),
    ("connection refused", "hf://testorg/tiny@main", {"HF_ENDPOINT": "closed"}, "cannot reach the Hub"),
])
def test_hub_failures_are_one_line(local_hub, capsys, monkeypatch, tmp_path, case, uri, env, expected):
    monkeypatch.setenv("REQUANT_HF_RETRIES", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    for name, value in env.items():
        if name == "fail":
            local_hub.server.fail_next(2, value, retry_after=0, path_contains="/revision/")
        elif value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, f"http://127.0.0.1:{_closed_port()}" if value == "closed" else value)
    rc, err = _cli(capsys, "convert", uri, str(tmp_path / "out"), "--local", "--recipe", RECIPE)
    assert rc == 2 and expected in err and len(err.splitlines()) == 1, err
    assert err.startswith("requant convert: error: hf://testorg/"), err
    assert local_hub.token not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert local_hub.server.state.take_failure("/revision/") is None  # the retries used up what was injected


@contextmanager
def _fault(local_hub, repo: str, path: str, fault: str, times: int | None = None):
    """The local Hub serves ``path`` of ``repo`` with ``fault`` (requant.testing.hubserver.HubState.set_fault)."""
    local_hub.server.set_fault(repo, path, fault, times)
    try:
        yield
    finally:
        local_hub.server.set_fault(repo, path, None)


SHARD = "model-00002-of-000004.safetensors"


@pytest.mark.parametrize("change, expected", [
    ("bytes", "differ from the published"),                           # only the whole-file sha256 sees it
    ("size", "changed under a pinned revision: the Hub now serves"),
    ("etag", "changed under a pinned revision: the Hub now serves sha256"),  # only the identity check sees it
])
def test_a_file_changed_under_a_pinned_revision_fails_naming_it(local_hub, tiny_upstream, capsys, tmp_path, change,
                                                                expected):
    repo = f"testorg/changed-{change}"
    commit = publish_dir(local_hub.root, repo, tiny_upstream)
    with _fault(local_hub, repo, SHARD, change):
        rc, err = _cli(capsys, "convert", f"hf://{repo}@main", str(tmp_path / "out"), "--local", "--recipe", RECIPE)
    assert rc == 2 and f"hf://{repo}@{commit}/{SHARD}" in err and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_range_read_of_a_file_whose_etag_changed_fails(local_hub, tiny_upstream):
    """The bytes are the published ones; only the Hub's ETag (X-Linked-Etag) says the file changed."""
    storage = HfStorage(f"hf://testorg/tiny@{local_hub.commits['tiny']}")
    assert storage.read_range(SHARD, 0, 8) == (tiny_upstream / SHARD).read_bytes()[:8]
    with _fault(local_hub, "testorg/tiny", SHARD, "etag"), pytest.raises(CheckpointError) as caught:
        storage.read_range(SHARD, 0, 8)
    assert f"{SHARD}: changed under a pinned revision: the Hub now serves sha256" in str(caught.value)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("victim", [SHARD, "config.json"])  # LFS (sha256), git (blob id)
def test_a_mirror_that_meets_a_corrupted_body_keeps_nothing_of_it_and_copies_it_next_time(
        local_hub, tiny_upstream, capsys, tmp_path, victim):
    repo = "testorg/mirror-transit"
    commit = publish_dir(local_hub.root, repo, tiny_upstream)
    dst, uri = tmp_path / "mirror", f"hf://{repo}@main"
    with _fault(local_hub, repo, victim, "transit", times=1):  # one byte flipped on the way, the headers right
        rc, err = _cli(capsys, "mirror", uri, str(dst), "--workers", "2")
    assert rc == 2 and len(err.splitlines()) == 1 and f"hf://{repo}@{commit}/{victim}: the bytes read" in err, err
    assert "differ from the published" in err, err
    snapshot, upstream = dst / "snapshots" / commit, _tree(tiny_upstream)
    present = _tree(snapshot)  # what was copied before the failure stopped the rest: whole and right; not it
    assert victim not in present and present == {f: upstream[f] for f in present}
    assert [p.name for p in dst.iterdir()] == ["snapshots"]  # no refs/main, no scratch left beside the mirror
    assert main(["mirror", uri, str(dst)]) == 0
    assert f"13 files, {13 - len(present)} copied, {len(present)} already there" in capsys.readouterr().out
    assert _tree(snapshot) == _tree(tiny_upstream) and (dst / "refs/main").read_text().strip() == commit


def test_a_mirrored_file_whose_bytes_changed_is_copied_again(local_hub, tiny_upstream, capsys, tmp_path):
    """'Already there' means the published digest, not the size: a flipped byte in the copy is copied again."""
    dst, uri = tmp_path / "mirror", f"hf://testorg/tiny@{local_hub.commits['tiny']}"
    assert main(["mirror", uri, str(dst)]) == 0
    snapshot = dst / "snapshots" / local_hub.commits["tiny"]
    for victim in (SHARD, "config.json"):  # LFS (sha256), git (blob id)
        data = bytearray((snapshot / victim).read_bytes())
        data[len(data) // 2] ^= 0x01
        (snapshot / victim).write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["mirror", uri, str(dst)]) == 0
    assert "13 files, 2 copied, 11 already there" in capsys.readouterr().out
    assert _tree(snapshot) == _tree(tiny_upstream)


def test_a_git_served_upstream_is_checked_against_its_blob_ids(local_hub, tiny_upstream, capsys, tmp_path):
    """A mirror serving a git repository (as olah does) lists git blob ids and no LFS sha256: every input is
    checked against its blob id, and a shard with one byte of a tensor flipped on its way (its headers, size and
    safetensors header intact: the conversion alone would not notice) fails the conversion naming it."""
    repo = "testorg/git-served"
    commit = publish_dir(local_hub.root, repo, tiny_upstream, lfs=False)
    assert not [f for f in HfStorage(f"hf://{repo}@{commit}").list_files()
                if HfStorage(f"hf://{repo}@{commit}").published_digest(f)[0] != "git blob id"]
    manifest = requant.convert(f"hf://{repo}@main", str(tmp_path / "clean"), RECIPE, progress=False, jobs=1).manifest
    inputs = [*manifest["inputs"]["shards"].values(), *manifest["inputs"]["files"].values()]
    assert inputs and all(d["verified_against_published"] for d in inputs)
    with _fault(local_hub, repo, SHARD, "bytes"):  # every read of it, range reads included
        rc, err = _cli(capsys, "convert", f"hf://{repo}@main", str(tmp_path / "out"), "--local", "--recipe", RECIPE)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"hf://{repo}@{commit}/{SHARD}: the bytes read (git blob id" in err and "from the published" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_inputs_without_a_published_digest_need_unverified(local_hub, tiny_upstream, capsys, tmp_path):
    repo = "testorg/no-digests"
    commit = publish_dir(local_hub.root, repo, tiny_upstream)
    local_hub.server.state.hide_digests(repo)
    try:
        rc, err = _cli(capsys, "convert", f"hf://{repo}@main", str(tmp_path / "out"), "--local", "--recipe", RECIPE)
        assert rc == 2 and len(err.splitlines()) == 1 and "pass --unverified" in err, err
        assert f"hf://{repo}@{commit}/model-0000" in err and "the Hub publishes no digest for it" in err, err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
        rc, err = _cli(capsys, "convert", f"hf://{repo}@main", str(tmp_path / "out"), "--local", "--recipe", RECIPE,
                       "--unverified")
    finally:
        local_hub.server.state.hide_digests(repo, False)
    said = [line for line in err.splitlines() if "unverified" in line]
    assert rc == 0 and len(said) == 1 and said[0].startswith("warning: ") and "converted unverified" in err, err
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    inputs = {**manifest["inputs"]["shards"], **manifest["inputs"]["files"]}
    assert manifest["unverified_inputs"] == sorted(inputs) and f"{len(inputs)} input files" in err
    assert all(not d["verified_against_published"] and d["unverified"] for d in inputs.values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"**Unverified inputs:** {len(inputs)} upstream files" in card and "`--unverified`" in card
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_convert_passes_unverified_to_the_flow_and_says_so(capsys, tmp_path):
    seen = {}

    def flow(source, dest, recipe, options):
        seen["options"] = options
        return ConvertSummary(output=dest, recipe=recipe, run_key="k", jobs=1, resumed=0, tensors=1,
                              unverified_inputs=("config.json",))

    assert main(["convert", "hf://o/r@main", str(tmp_path / "out"), "--recipe", RECIPE, "--unverified"],
                convert_flow=flow) == 0
    assert seen["options"].unverified is True
    assert "warning: hf://o/r@main: 1 input files converted unverified" in capsys.readouterr().err


def test_mirror_and_publish_commands(local_hub, tiny_upstream, capsys, tmp_path):
    """`requant hub publish` moves a branch of the served Hub; `requant mirror` copies that revision into a
    directory in the cache layout, each file checked, and a second mirror copies nothing."""
    assert main(["hub", "publish", str(local_hub.root), "testorg/mirrored", str(tiny_upstream)]) == 0
    commit = capsys.readouterr().out.split()[-1]
    assert resolve_revision("testorg/mirrored", "main") == commit
    dst = tmp_path / "mirror"
    for copied in (13, 0):
        assert main(["mirror", "hf://testorg/mirrored@main", str(dst), "--workers", "2"]) == 0
        assert f"13 files, {copied} copied" in capsys.readouterr().out
    snapshot = dst / "snapshots" / commit
    assert {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()} == \
        {p.relative_to(tiny_upstream).as_posix(): p.read_bytes() for p in tiny_upstream.rglob("*") if p.is_file()}
    assert (dst / "refs/main").read_text().strip() == commit
