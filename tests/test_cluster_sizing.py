"""Jobs sized for the cluster: MoE layer jobs split into expert groups hold every task once and convert to the same
tensors; a layout-only synth plans as the real one; the schedule simulation on hand-counted cases."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from requant.bench.cluster import best_split, candidate_parts, simulate
from requant.io.storage import LocalDir
from requant.job import run_job
from requant.planning import build_plan, split_jobs
from requant.recipe import load_recipe
from requant.testing.synth import synthesize


@pytest.fixture(scope="module")
def plan(tiny_upstream):
    return build_plan(LocalDir(tiny_upstream), load_recipe("amd-kimi-mxfp4"))


def test_split_jobs_cut_each_moe_layer_into_expert_groups_holding_every_task_once(plan):
    split = split_jobs(plan.jobs, 3)
    whole = {job.name: job for job in plan.jobs}
    moe = [name for name, job in whole.items() if any(".mlp.experts." in t.name for t in job.tasks)]
    assert moe and len(split) == len(plan.jobs) + 2 * len(moe)  # tiny: 8 experts in groups of 2, 3, 3
    assert [job.index for job in split] == list(range(len(split)))
    assert len({job.output_file for job in split}) == len(split)
    assert all(job.output_file.endswith(f"-of-{len(split):05d}.safetensors") for job in split)
    for name in moe:
        parts = [job for job in split if job.name.startswith(f"{name}-experts-")]
        assert [job.name.removeprefix(f"{name}-experts-") for job in parts] == ["000-001", "002-004", "005-007"]
        assert sorted(t.name for job in parts for t in job.tasks) == sorted(t.name for t in whole[name].tasks)
        assert all(".mlp.experts." in t.name for job in parts[1:] for t in job.tasks)  # the rest with the first
        assert any(".self_attn." in t.name for t in parts[0].tasks)
    for job in split:
        if job.name in whole:  # jobs without experts are kept whole
            assert job.tasks == whole[job.name].tasks
    assert [job.name for job in split_jobs(plan.jobs, 1)] == list(whole)
    assert len(split_jobs(plan.jobs, 100)) == len(plan.jobs) + 7 * len(moe)  # at most one group per expert
    with pytest.raises(ValueError):
        split_jobs(plan.jobs, 0)


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def test_split_jobs_write_the_tensors_the_whole_jobs_write(plan, tiny_upstream, tmp_path):
    source = LocalDir(tiny_upstream)
    for label, jobs in (("whole", plan.jobs), ("split", split_jobs(plan.jobs, 3))):
        for job in jobs:
            run_job(job, source, tmp_path / label)
    whole, split = _tensors(tmp_path / "whole"), _tensors(tmp_path / "split")
    assert sorted(whole) == sorted(split)
    for name, tensor in whole.items():
        assert tensor.dtype == split[name].dtype and torch.equal(tensor.view(torch.uint8), split[name].view(torch.uint8)), name


def test_a_layout_only_synth_is_sparse_and_plans_as_the_real_one(tiny_upstream, tmp_path, plan):
    layout = synthesize(tmp_path / "layout", "tiny", seed=0, progress=False, layout_only=True)
    shards = sorted(layout.glob("*.safetensors"))
    assert [p.name for p in shards] == sorted(p.name for p in tiny_upstream.glob("*.safetensors"))
    for shard in shards:
        assert shard.stat().st_size == (tiny_upstream / shard.name).stat().st_size
        assert shard.stat().st_blocks * 512 < shard.stat().st_size  # a hole where the data would be
    planned = build_plan(LocalDir(layout), load_recipe("amd-kimi-mxfp4"))
    assert [(j.name, j.output_file, j.bytes_in, j.bytes_out) for j in planned.jobs] == \
        [(j.name, j.output_file, j.bytes_in, j.bytes_out) for j in plan.jobs]


def test_the_schedule_starts_each_job_in_order_on_the_first_free_worker():
    s = simulate([3.0, 3.0, 3.0, 1.0], workers=2)  # 3 | 3, then 3 after the first, 1 after the second
    assert (s.makespan, s.longest_job, s.jobs) == (6.0, 3.0, 4) and math.isclose(s.idle_share, 1 - 10 / 12)
    s = simulate([1.0] * 8, workers=8)
    assert s.makespan == 1.0 and s.idle_share == 0.0
    s = simulate([2.0, 1.0], workers=4)  # more workers than jobs: two never work
    assert s.makespan == 2.0 and math.isclose(s.idle_share, 1 - 3 / 8)
    assert [len(candidate_parts(w, 60)) for w in (8, 60, 61, 512)] == [2, 2, 4, 18]


def test_the_best_split_is_the_shortest_simulated_wall_and_the_fewest_groups_among_equals():
    # one layer of 4 units of work on 4 workers: whole 4 s, in 2 groups 2 s, in 4 groups 1 s
    sizes = {1: [4], 2: [2, 2], 3: [2, 1, 1], 4: [1, 1, 1, 1]}
    assert best_split(sizes, workers=4, rate=1.0)[0] == 4
    assert best_split(sizes, workers=2, rate=1.0)[0] == 2  # 2 s with 2 or 4 groups: the fewer
    parts, schedule = best_split(sizes, workers=1, rate=1.0)
    assert parts == 1 and schedule.makespan == 4.0
