"""Integrity end to end: corrupted upstream bytes are caught before anything is published, a flipped byte in
any published object is caught by `requant verify`, and nothing is published with a job output missing."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from hardening_support import scale

import requant
from requant.errors import CheckpointError, VerifyError
from requant.io.s3 import S3Storage
from requant.manifest import MANIFEST_FILE
from requant.run import input_digest
from requant.testing import seaweed
from requant.verification import verify


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = seaweed.start(tmp_path_factory.mktemp("seaweed-integrity"))
    with seaweed.exported_env(server):
        yield server
        seaweed.stop(server)


@pytest.fixture(scope="module")
def converted(tiny_upstream, tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity") / "mx"
    requant.convert(str(tiny_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
    return out


def test_bit_flips_in_an_s3_upstream_are_caught_when_read(s3, tiny_upstream, ledger):
    rng = random.Random(0)
    shards = sorted(p.name for p in tiny_upstream.glob("*.safetensors"))
    for trial in range(scale(3, 12)):
        uri = f"s3://upstream-integrity/t{trial}"
        storage = S3Storage(uri)
        storage.ensure_bucket()
        for path in tiny_upstream.iterdir():
            storage.put_file(path.name, path)                          # records each object's sha256
        victim = rng.choice(shards)
        data = bytearray((tiny_upstream / victim).read_bytes())
        data[rng.randrange(len(data) // 2, len(data))] ^= 1 << rng.randrange(8)   # in tensor data
        # bit rot: the object changes behind the metadata that vouched for it
        storage.s3.put_object(Bucket=storage.bucket, Key=storage.key(victim), Body=bytes(data),
                              Metadata={"sha256": storage.recorded_sha256(victim)})
        with pytest.raises(CheckpointError, match="differs from the published") as info:
            input_digest(storage, victim)
        assert victim in str(info.value)
        for other in shards:                                           # the intact ones still pass
            if other != victim:
                assert input_digest(storage, other)["verified_against_published"]
        # tests/flow/test_integrity_flow.py: the flow then fails before publishing anything
        ledger.record("integrity: upstream bit flips (S3, published sha256)", "caught before publish")


def test_flipped_bytes_in_published_objects_are_caught_by_verify(converted, tmp_path, ledger):
    rng = random.Random(1)
    manifest = json.loads((converted / MANIFEST_FILE).read_text())
    names = sorted(manifest["outputs"])
    for trial in range(scale(20, 200)):
        copy = tmp_path / f"c{trial}"
        shutil.copytree(converted, copy)
        name = rng.choice(names)
        data = bytearray((copy / name).read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(VerifyError) as info:
            verify(str(copy))
        assert name in str(info.value)
        ledger.record("integrity: flipped byte in a published object", f"caught ({name.rsplit('.', 1)[-1]})")
        shutil.rmtree(copy)


def test_verify_catches_missing_and_unlisted_objects(converted, tmp_path, ledger):
    for case in ("missing shard", "missing manifest", "extra file"):
        copy = tmp_path / case.replace(" ", "-")
        shutil.copytree(converted, copy)
        if case == "missing shard":
            next(copy.glob("*.safetensors")).unlink()
        elif case == "missing manifest":
            (copy / MANIFEST_FILE).unlink()
        else:
            (copy / "model-99999.safetensors").write_bytes(b"x")
        with pytest.raises(VerifyError):
            verify(str(copy))
        ledger.record("integrity: missing / unlisted objects", "caught")
