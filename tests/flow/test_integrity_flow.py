"""A bit flip in an upstream object that carries a published sha256 fails the requantize flow before it
publishes anything; the output prefix holds no manifest, so nothing looks complete."""

from __future__ import annotations

import pytest

from requant.io.s3 import S3Storage
from requant.io.transfer import upload_dir
from requant.manifest import MANIFEST_FILE

pytestmark = pytest.mark.services


def test_corrupted_upstream_object_fails_the_flow_before_publish(prefect_api, s3_server, tiny_upstream, clean_prefix):
    from flows.requantize import requantize

    uri = "s3://upstream/tiny-bitrot"
    upload_dir(tiny_upstream, uri)
    storage = S3Storage(uri)
    victim = sorted(p.name for p in tiny_upstream.glob("*.safetensors"))[1]
    data = bytearray((tiny_upstream / victim).read_bytes())
    data[-5] ^= 0x10
    storage.s3.put_object(Bucket=storage.bucket, Key=storage.key(victim), Body=bytes(data),
                          Metadata={"sha256": storage.recorded_sha256(victim)})
    state = requantize(upstream=uri, output=clean_prefix, recipe="kimi-k2.6-mxfp4", progress=False, evaluate=False,
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=f"{victim}.*differs from the published"):
        state.result()
    assert not S3Storage(clean_prefix).exists(MANIFEST_FILE)


def test_object_changed_after_publish_is_unpublished(prefect_api, s3_server, s3_tiny, clean_prefix, monkeypatch):
    """If verification after publishing finds an object that differs from the manifest, the manifest is
    removed again: a prefix that fails verification never looks complete."""
    from flows.requantize import requantize
    from requant import pipeline

    original = pipeline.publish

    def publish_then_corrupt(plan, results, source_uri, dest_uri, *args, **kwargs):
        manifest = original(plan, results, source_uri, dest_uri, *args, **kwargs)
        storage = S3Storage(dest_uri)
        shard = sorted(n for n in manifest["outputs"] if n.endswith(".safetensors"))[0]
        data = bytearray(storage.read_bytes(shard))
        data[-3] ^= 0x01
        storage.s3.put_object(Bucket=storage.bucket, Key=storage.key(shard), Body=bytes(data))
        return manifest

    monkeypatch.setattr(pipeline, "publish", publish_then_corrupt)
    state = requantize(upstream=s3_tiny, output=clean_prefix, recipe="kimi-k2.6-mxfp4", progress=False, evaluate=False,
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="sha256 differs from the manifest"):
        state.result()
    assert not S3Storage(clean_prefix).exists(MANIFEST_FILE)
