"""A bit flip in an upstream object that carries a published sha256 fails the requantize flow before it
publishes anything; the output prefix holds no manifest, so nothing looks complete."""

from __future__ import annotations

import pytest

from requant.io.s3 import S3Storage
from requant.io.transfer import upload_dir
from requant.manifest import MANIFEST_FILE

pytestmark = pytest.mark.services


def test_corrupted_upstream_object_fails_the_flow_before_publish(prefect_api, s3_server, tiny_upstream, clean_prefix):
    from requant.flows.requantize import requantize

    uri = "s3://upstream/tiny-bitrot"
    upload_dir(tiny_upstream, uri)
    storage = S3Storage(uri)
    victim = sorted(p.name for p in tiny_upstream.glob("*.safetensors"))[1]
    data = bytearray((tiny_upstream / victim).read_bytes())
    data[-5] ^= 0x10
    storage.s3.put_object(Bucket=storage.bucket, Key=storage.key(victim), Body=bytes(data),
                          Metadata={"sha256": storage.recorded_sha256(victim)})
    state = requantize(upstream=uri, output=clean_prefix, recipe="kimi-k2.6-mxfp4", progress=False, evaluation={"enabled": False},
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=f"{victim}.*differs from the published"):
        state.result()
    assert not S3Storage(clean_prefix).exists(MANIFEST_FILE)


def test_object_changed_after_publish_is_unpublished(prefect_api, s3_server, s3_tiny, clean_prefix, monkeypatch):
    """If verification after publishing finds an object that differs from the manifest, the manifest is
    removed again: a prefix that fails verification never looks complete."""
    from requant import run
    from requant.flows.requantize import requantize

    original = run.publish

    def publish_then_corrupt(plan, results, source_uri, dest_uri, *args, **kwargs):
        manifest = original(plan, results, source_uri, dest_uri, *args, **kwargs)
        storage = S3Storage(dest_uri)
        shard = sorted(n for n in manifest["outputs"] if n.endswith(".safetensors"))[0]
        data = bytearray(storage.read_bytes(shard))
        data[-3] ^= 0x01
        storage.s3.put_object(Bucket=storage.bucket, Key=storage.key(shard), Body=bytes(data))
        return manifest

    monkeypatch.setattr(run, "publish", publish_then_corrupt)
    state = requantize(upstream=s3_tiny, output=clean_prefix, recipe="kimi-k2.6-mxfp4", progress=False, evaluation={"enabled": False},
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="sha256 differs from the manifest"):
        state.result()
    assert not S3Storage(clean_prefix).exists(MANIFEST_FILE)


SHARD = "model-00002-of-000004.safetensors"


def test_a_git_served_hub_shard_corrupted_on_its_way_fails_the_flow(prefect_api, local_hub, tiny_upstream, clean_prefix):
    """A Hub mirror serving a git repository (olah) lists git blob ids, no LFS sha256: the flow checks every input
    against its blob id, so a shard with one tensor byte flipped on its way fails the run naming it, unpublished."""
    from requant.flows.requantize import requantize
    from requant.testing.hubserver import publish_dir

    repo = "testorg/git-served-flow"
    commit = publish_dir(local_hub.root, repo, tiny_upstream, lfs=False)
    local_hub.server.set_fault(repo, SHARD, "bytes")
    try:
        state = requantize(upstream=f"hf://{repo}@main", output=clean_prefix, recipe="kimi-k2.6-mxfp4",
                           progress=False, evaluation={"enabled": False}, return_state=True)
    finally:
        local_hub.server.set_fault(repo, SHARD, None)
    assert state.is_failed()
    with pytest.raises(Exception, match=f"{repo}@{commit}/{SHARD}: the bytes read \\(git blob id .* differ from the "
                                         "published"):
        state.result()
    assert not S3Storage(clean_prefix).exists(MANIFEST_FILE)


def test_hub_inputs_without_a_digest_need_unverified_in_the_flow(prefect_api, local_hub, tiny_upstream, clean_prefix):
    """Refused before any job runs; with ``unverified`` converted, and the manifest, the card and the summary say so."""
    import json

    from requant.flows.requantize import requantize
    from requant.testing.hubserver import publish_dir

    repo = "testorg/no-digests-flow"
    publish_dir(local_hub.root, repo, tiny_upstream)
    local_hub.server.state.hide_digests(repo)
    S3Storage(clean_prefix).ensure_bucket()
    try:
        state = requantize(upstream=f"hf://{repo}@main", output=clean_prefix, recipe="kimi-k2.6-mxfp4",
                           progress=False, evaluation={"enabled": False}, return_state=True)
        assert state.is_failed()
        with pytest.raises(Exception, match="the Hub publishes no digest for it .*pass --unverified"):
            state.result()
        assert not S3Storage(clean_prefix).list_files()  # refused at plan time: nothing written, no lease taken
        summary, again = [requantize(upstream=f"hf://{repo}@main", output=clean_prefix, recipe="kimi-k2.6-mxfp4",
                                     progress=False, evaluation={"enabled": False}, conversion={"unverified": True}) for _ in range(2)]
    finally:
        local_hub.server.state.hide_digests(repo, False)
    storage = S3Storage(clean_prefix)
    manifest = json.loads(storage.read_bytes(MANIFEST_FILE))
    inputs = {**manifest["inputs"]["shards"], **manifest["inputs"]["files"]}
    assert manifest["unverified_inputs"] == list(summary.conversion.unverified_inputs) == sorted(inputs)
    assert again.conversion.reused and list(again.conversion.unverified_inputs) == sorted(inputs)  # reused: still said
    assert all(not d["verified_against_published"] and d["unverified"] for d in inputs.values())
    assert "**Unverified inputs:**" in storage.read_bytes("README.md").decode()


def test_an_s3_mirror_keeps_nothing_of_a_file_corrupted_on_its_way(s3_server, local_hub, tiny_upstream):
    """The multipart upload of a file whose body was corrupted in transit is aborted: nothing of it is visible, no
    refs/main; the next mirror copies it (and only what is missing)."""
    import uuid

    from requant.errors import CheckpointError
    from requant.io.mirror import mirror_local

    commit, mirror = local_hub.commits["tiny"], f"s3://mirror/{uuid.uuid4().hex[:8]}"
    local_hub.server.set_fault("testorg/tiny", SHARD, "transit", times=1)
    try:
        with pytest.raises(CheckpointError, match=f"{SHARD}: the bytes read .* differ from the published"):
            mirror_local("hf://testorg/tiny@main", mirror, workers=1)
    finally:
        local_hub.server.set_fault("testorg/tiny", SHARD, None)
    storage = S3Storage(mirror)
    present = storage.list_files()
    assert f"snapshots/{commit}/{SHARD}" not in present and "refs/main" not in present
    uploads = storage.s3.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.key(f"snapshots/{commit}/{SHARD}"))
    assert not uploads.get("Uploads")  # aborted, not left pending
    summary = mirror_local("hf://testorg/tiny@main", mirror)
    assert summary["copied"] == 13 - len(present) and summary["files"] == 13
    assert storage.read_bytes(f"snapshots/{commit}/{SHARD}") == (tiny_upstream / SHARD).read_bytes()
    assert storage.read_bytes("refs/main").decode().strip() == commit
