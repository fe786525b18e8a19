"""Resume (requant.run.execute_job): a job whose shard is intact is skipped; one whose shard no longer matches
its record (same size, one byte flipped) is run again and its original bytes come back; layer jobs whole and split
into expert groups alike."""

from __future__ import annotations

import pytest

from requant.io.storage import LocalDir
from requant.planning import build_plan
from requant.recipe import load_recipe
from requant.run import execute_job, record_path, run_key


@pytest.fixture(scope="module", params=[1, 3], ids=["whole", "expert-groups"])
def planned(tiny_upstream, request):
    plan = build_plan(LocalDir(tiny_upstream), load_recipe("kimi-k2.6-mxfp4"), expert_groups=request.param)
    job = next(j for j in plan.jobs if any(t.target == "mxfp4" for t in j.tasks))   # a layer with MXFP4 experts
    return plan, job, run_key(plan, None)


def test_intact_shard_is_skipped_and_a_corrupted_one_is_rerun(planned, tiny_upstream, tmp_path):
    plan, job, key = planned
    dest = tmp_path / "out"
    first = execute_job(job, str(tiny_upstream), str(dest), key)
    assert not first.skipped
    shard = dest / job.output_file
    original = shard.read_bytes()
    assert (dest / record_path(key, job)).is_file()

    written = shard.stat().st_mtime_ns
    again = execute_job(job, str(tiny_upstream), str(dest), key)
    assert again.skipped and again.result.sha256 == first.result.sha256
    assert shard.stat().st_mtime_ns == written and shard.read_bytes() == original

    data = bytearray(original)
    data[len(data) - 7] ^= 0x10                       # in the tensor data; the size stays the same
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == len(original)
    rerun = execute_job(job, str(tiny_upstream), str(dest), key)
    assert not rerun.skipped, "a shard that no longer matches its record was taken as finished"
    assert shard.read_bytes() == original
    assert rerun.result.sha256 == first.result.sha256 and rerun.result.size == len(original)

    after = execute_job(job, str(tiny_upstream), str(dest), key)
    assert after.skipped
