"""S3Storage against a real S3 server (SeaweedFS), and the hf:// source up to the network."""

from __future__ import annotations

import base64
import hashlib

import pytest
import torch

from requant.errors import CheckpointError, RequantError
from requant.io.hf import parse_hf_uri
from requant.io.s3 import S3Storage, parse_s3_uri
from requant.io.safetensors import read_header, read_tensor
from requant.io.storage import LocalDir, open_storage


@pytest.mark.services
def test_range_reads_and_headers_match_local(s3_server, s3_tiny, tiny_upstream):
    s3, local = S3Storage(s3_tiny), LocalDir(tiny_upstream)
    assert s3.list_files() == local.list_files()
    shard = next(f for f in local.list_files() if f.endswith(".safetensors"))
    remote_header, _ = read_header(s3, shard)
    local_header, _ = read_header(local, shard)
    assert [(e.name, e.start, e.end) for e in remote_header.values()] == [(e.name, e.start, e.end) for e in local_header.values()]
    entry = next(iter(remote_header.values()))
    raw = lambda t: t.contiguous().view(torch.uint8).numpy().tobytes()  # noqa: E731
    assert raw(read_tensor(s3, entry)) == raw(read_tensor(local, entry))
    assert s3.sha256(shard) == local.sha256(shard)


@pytest.mark.services
def test_multipart_upload_keeps_sha256(s3_server, tmp_path, monkeypatch):
    import requant.io.s3 as s3mod

    monkeypatch.setattr(s3mod, "MULTIPART_CHUNK", 5 * 1024 * 1024)  # S3's minimum part size
    blob = tmp_path / "big.bin"
    blob.write_bytes(bytes(range(256)) * (12 * 1024 * 1024 // 256))  # 12 MiB -> 3 parts
    storage = S3Storage("s3://multipart/x")
    storage.ensure_bucket()
    info = storage.put_file("big.bin", blob)
    assert storage.size("big.bin") == blob.stat().st_size
    assert storage.sha256("big.bin") == info["sha256"] == storage.recorded_sha256("big.bin")
    assert storage.read_range("big.bin", 5 * 1024 * 1024 - 3, 5 * 1024 * 1024 + 3) == blob.read_bytes()[5 * 1024 * 1024 - 3 : 5 * 1024 * 1024 + 3]
    # The server kept it as 3 parts, each checked by SHA256: its composite checksum is the SHA256 of the
    # parts' SHA256 digests, which we recompute from the bytes, so a part sent without a checksum fails here.
    head = storage.s3.head_object(Bucket="multipart", Key="x/big.bin", ChecksumMode="ENABLED")
    data, part = blob.read_bytes(), 5 * 1024 * 1024
    digests = b"".join(hashlib.sha256(data[i:i + part]).digest() for i in range(0, len(data), part))
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(digests).digest()).decode() + "-3"
    assert storage.s3.head_object(Bucket="multipart", Key="x/big.bin", PartNumber=1)["PartsCount"] == 3


@pytest.mark.services
def test_streamed_upload_sends_parts_while_written_and_is_invisible_until_complete(s3_server):
    """MultipartStream: odd-sized writes become 5 MiB parts sent as they fill, each with a SHA256 that S3 checks
    (the composite checksum is recomputed from the bytes); the object appears only at complete, with the ETag
    returned; an aborted stream leaves neither an object nor an open upload."""
    from requant.io.s3 import MultipartStream

    part = 5 * 1024 * 1024
    data = hashlib.sha256(b"seed").digest() * (13 * 1024 * 1024 // 32 + 7)  # 13 MiB and a bit: 3 parts
    storage = S3Storage("s3://streamed/x")
    storage.ensure_bucket()
    stream = MultipartStream(storage, "shard.safetensors", part_size=part)
    for i in range(0, len(data), 1_000_003):
        stream.write(memoryview(data)[i : i + 1_000_003])
        if i > 2 * part:
            assert len(stream._parts) == 2  # the first two parts went out before the end
    assert not storage.exists("shard.safetensors")
    etag = stream.complete()
    assert storage.read_bytes("shard.safetensors") == data
    head = storage.s3.head_object(Bucket="streamed", Key="x/shard.safetensors", ChecksumMode="ENABLED")
    digests = b"".join(hashlib.sha256(data[i:i + part]).digest() for i in range(0, len(data), part))
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(digests).digest()).decode() + "-3"
    assert head["ETag"] == etag and storage.head("shard.safetensors")["ETag"] == etag

    aborted = MultipartStream(storage, "aborted.safetensors", part_size=part)
    aborted.write(data[: part + 10])
    aborted.abort()
    assert not storage.exists("aborted.safetensors")
    uploads = storage.s3.list_multipart_uploads(Bucket="streamed").get("Uploads", [])
    assert not [u for u in uploads if u["Key"] == "x/aborted.safetensors"]


def _volumes(server) -> tuple[int, int]:
    """(volumes, slots) of the embedded server, from its master's topology."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['master']}/dir/status", timeout=10) as r:
        topology = json.load(r)["Topology"]
    return topology["Max"] - topology["Free"], topology["Max"]


@pytest.mark.services
def test_every_new_bucket_takes_one_volume_slot(s3_server):
    """A bucket is a SeaweedFS collection. weed's default grows a collection by 7 volumes, out of slots derived
    from the free disk: the session's server ran out at its ~13th bucket (24 GB free) and later writes failed with
    InternalError. The embedded server grows by one volume, and has slots for thousands of buckets."""
    import uuid

    before, slots = _volumes(s3_server.current)
    names = [f"slots-{uuid.uuid4().hex[:8]}-{i}" for i in range(20)]
    for name in names:
        storage = S3Storage(f"s3://{name}/p")
        storage.ensure_bucket()
        assert storage.put_bytes("a/claim.json", b"{}", if_none_match=True)
    after, _ = _volumes(s3_server.current)
    assert after - before == len(names)
    assert slots >= 4096


@pytest.mark.services
def test_conditional_write_and_missing_objects(s3_server):
    storage = S3Storage("s3://conditional/p")
    storage.ensure_bucket()
    assert storage.put_bytes("ledger", b"a", if_none_match=True) is True
    assert storage.put_bytes("ledger", b"b", if_none_match=True) is False
    assert storage.read_bytes("ledger") == b"a"
    with pytest.raises(CheckpointError, match="missing"):
        storage.read_bytes("nope")
    with pytest.raises(CheckpointError, match="outside"):
        storage.read_bytes("../other/key")


def test_uri_parsing():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    with pytest.raises(RequantError, match="3 characters"):
        parse_s3_uri("s3://ab/x")
    assert parse_hf_uri("hf://moonshotai/Kimi-K2.6@abc123") == ("moonshotai/Kimi-K2.6", "abc123")
    for bad in ("hf://moonshotai/Kimi-K2.6", "hf://Kimi@main", "hf://a/b/c@main"):
        with pytest.raises(RequantError):
            parse_hf_uri(bad)
    with pytest.raises(CheckpointError, match="unsupported"):
        open_storage("gs://bucket/x")

