"""Layer jobs stream their shards into object storage while they are produced, front to back (no scratch copy; a
per-channel FP8 shard in two passes): the object equals the locally written shard byte for byte, nothing is visible
before it is complete, resume recognises the streamed object by its ETag, and a changed object is converted again."""

from __future__ import annotations

import pytest

from requant.io.s3 import S3Storage
from requant.io.safetensors import layout
from requant.io.storage import LocalDir
from requant.job import write_passes
from requant.planning import build_plan
from requant.recipe import load_recipe
from requant.run import execute_job, record_path, run_key

pytestmark = pytest.mark.services


def test_mxfp4_and_bf16_shards_stream_in_one_pass_fp8_in_two(tiny_upstream):
    for recipe, passes in (("kimi-k2.6-mxfp4", 1), ("bf16-staging", 1), ("fp8-reference", 2)):
        for job in build_plan(LocalDir(tiny_upstream), load_recipe(recipe)).jobs:
            stretches = write_passes(job)
            quantized = [t for t in job.tasks if t.kind in ("int4", "dense") and t.target != "unquantized"]
            assert len(stretches) == (passes if quantized else 1), (recipe, job.name)
            # together the stretches are the file, front to back, each output written once
            order = [s.name for s in layout(job.specs)]
            assert sorted(n for p in stretches for n in p.outputs) == sorted(order)
            assert [min(order.index(n) for n in p.outputs) for p in stretches] == sorted(min(order.index(n) for n in p.outputs) for p in stretches)
            if passes == 2 and quantized:  # the second pass transcodes the FP8 modules again, for their weights only
                assert {t.name for t in stretches[1].tasks} == {t.name for t in quantized}
                assert stretches[1].outputs == {f"{t.name}.weight" for t in quantized}


@pytest.mark.parametrize("recipe", ["kimi-k2.6-mxfp4", "fp8-reference"])
def test_streamed_shard_equals_the_local_one_and_resumes_by_etag(s3_tiny, tiny_upstream, clean_prefix, tmp_path,
                                                                  monkeypatch, recipe):
    plan = build_plan(LocalDir(tiny_upstream), load_recipe(recipe))
    key = run_key(plan, None)
    job = max(plan.jobs, key=lambda j: j.bytes_out)
    local = execute_job(job, str(tiny_upstream), str(tmp_path / "local"), key)
    monkeypatch.setenv("REQUANT_SCRATCH", str(tmp_path / "no-scratch"))  # streaming needs none: it does not exist
    first = execute_job(job, s3_tiny, clean_prefix, key)
    assert not first.skipped and first.result.etag
    dest = S3Storage(clean_prefix)
    assert dest.read_bytes(job.output_file) == (tmp_path / "local" / job.output_file).read_bytes()
    assert first.result.sha256 == local.result.sha256 and dest.exists(record_path(key, job))

    monkeypatch.setattr(S3Storage, "sha256", lambda self, path: pytest.fail("resume re-read the streamed shard"))
    again = execute_job(job, s3_tiny, clean_prefix, key)
    assert again.skipped and again.result.sha256 == first.result.sha256
    monkeypatch.undo()

    data = bytearray(dest.read_bytes(job.output_file))
    data[-3] ^= 0x01  # rewritten behind the record: same size, new object, new ETag
    dest.s3.put_object(Bucket=dest.bucket, Key=dest.key(job.output_file), Body=bytes(data))
    rerun = execute_job(job, s3_tiny, clean_prefix, key)
    assert not rerun.skipped and dest.read_bytes(job.output_file) == (tmp_path / "local" / job.output_file).read_bytes()
