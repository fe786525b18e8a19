"""``hf://`` upstreams through the real huggingface_hub client against the local Hub (requant.io.hubserver):
conversions equal the directory's, pinned revisions, range reads (also from a server that ignores Range), and
every failure a user meets as one line with a non-zero exit and nothing at the destination."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from requant.cli import main
from requant.convert import run_local
from requant.io.hf import HfStorage, resolve_revision
from requant.io.hubserver import publish, publish_dir
from requant.manifest import MANIFEST_FILE

RECIPE = "kimi-k2.6-mxfp4"


@pytest.fixture(scope="module")
def from_directory(tmp_path_factory, tiny_upstream) -> Path:
    out = tmp_path_factory.mktemp("dir") / "mx"
    run_local(str(tiny_upstream), str(out), RECIPE, progress=False)
    return out


def _shards(out: Path) -> dict[str, bytes]:
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    return {f: (out / f).read_bytes() for f in manifest["outputs"] if f.endswith(".safetensors")}


def _cli(capsys, *argv) -> tuple[int, str]:
    """Exit status and what stderr said besides progress bars (which must be all else it printed)."""
    rc = main(list(argv))
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip() and "%|" not in line]
    return rc, "\n".join(lines)


def test_convert_from_the_hub_equals_the_directory_and_pins_the_commit(local_hub, from_directory, tmp_path):
    seen = len(local_hub.server.requests)
    out = tmp_path / "mx"
    manifest = run_local("hf://testorg/gated@main", str(out), RECIPE, progress=False, jobs=1).manifest
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


@pytest.mark.parametrize("change", ["bytes", "size"])
def test_a_file_changed_under_a_pinned_revision_fails_naming_it(local_hub, tiny_upstream, capsys, tmp_path, change):
    repo = f"testorg/changed-{change}"
    commit = publish_dir(local_hub.root, repo, tiny_upstream)
    shard = "model-00002-of-000004.safetensors"
    served = local_hub.root / repo / "commits" / commit / shard  # hard-linked to the upstream: replace, never edit
    data = bytearray(served.read_bytes())
    if change == "bytes":
        data[-5] ^= 0x40  # in a tensor: the conversion itself would not notice
    else:
        data = data[:-64]
    replacement = tmp_path / "replacement"
    replacement.write_bytes(bytes(data))
    os.replace(replacement, served)
    rc, err = _cli(capsys, "convert", f"hf://{repo}@main", str(tmp_path / "out"), "--local", "--recipe", RECIPE)
    assert rc == 2 and f"hf://{repo}@{commit}/{shard}" in err and len(err.splitlines()) == 1, err
    assert ("from the published" if change == "bytes" else "changed under a pinned revision") in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


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
