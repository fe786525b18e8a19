"""Jobs sized for the cluster: MoE layer jobs split into expert groups hold every task once and convert to the same
tensors; a layout-only synth plans as the real one; the schedule simulation on hand-counted cases."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from requant.io.storage import LocalDir
from requant.job import run_job
from requant.planning import build_plan, job_shapes, split_jobs, split_plan, split_sizes
from requant.recipe import load_recipe
from requant.sizing import best_split, candidate_parts, expert_groups_for, simulate
from requant.testing.synth import synthesize


@pytest.fixture(scope="module")
def plan(tiny_upstream):
    return build_plan(LocalDir(tiny_upstream), load_recipe("amd-kimi-mxfp4"))


def test_split_jobs_cut_each_moe_layer_into_expert_groups_holding_every_task_once(plan):
    split = split_jobs(plan.jobs, 3)
    whole = {job.name: job for job in plan.jobs}
    moe = [name for name, job in whole.items() if any(".mlp.experts." in t.name for t in job.tasks)]
    # tiny: 8 experts in groups of 2, 3, 3; the non-layer job's 19 tensors in 3 parts
    assert moe and len(split) == len(plan.jobs) + 2 * len(moe) + 2
    assert [job.index for job in split] == list(range(len(split)))
    assert len({job.output_file for job in split}) == len(split)
    assert all(job.output_file.endswith(f"-of-{len(split):05d}.safetensors") for job in split)
    for name in moe:
        parts = [job for job in split if job.name.startswith(f"{name}-experts-")]
        assert [job.name.removeprefix(f"{name}-experts-") for job in parts] == ["000-001", "002-004", "005-007"]
        assert sorted(t.name for job in parts for t in job.tasks) == sorted(t.name for t in whole[name].tasks)
        assert all(".mlp.experts." in t.name for job in parts[1:] for t in job.tasks)  # the rest with the first
        assert any(".self_attn." in t.name for t in parts[0].tasks)
    rest = [job for job in split if job.name.startswith("non-layer-")]
    assert [job.name for job in rest] == ["non-layer-1-of-3", "non-layer-2-of-3", "non-layer-3-of-3"]
    assert sorted(t.name for job in rest for t in job.tasks) == sorted(t.name for t in whole["non-layer"].tasks)
    sums = [job.bytes_in for job in rest]
    assert max(sums) - min(sums) <= max(t.bytes_in for t in whole["non-layer"].tasks)  # about even, by whole tensors
    for job in split:
        if job.name in whole:  # the dense layer is kept whole
            assert job.tasks == whole[job.name].tasks
    assert [job.name for job in split_jobs(plan.jobs, 1)] == list(whole)
    # at most one group per expert, one part per tensor
    assert len(split_jobs(plan.jobs, 100)) == len(plan.jobs) + 7 * len(moe) + len(whole["non-layer"].tasks) - 1
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


def test_split_sizes_are_the_bytes_of_the_jobs_split_jobs_makes(plan):
    shapes = job_shapes(plan.jobs)
    assert [len(s.experts) for s in shapes] == [0, 0, 8, 8]  # tiny: non-layer, a dense layer, two MoE layers
    for parts in (1, 2, 3, 5, 8, 9):
        assert split_sizes(shapes, parts) == [job.bytes_in for job in split_jobs(plan.jobs, parts)], parts


@pytest.fixture(scope="module")
def k26_six_layers(tmp_path_factory):
    """k26-topology's layout cut to 6 layers (as the flow tests' medium upstream): 5 MoE layers of 384 experts."""
    import dataclasses

    from requant.testing.synth import PROFILES

    profile = dataclasses.replace(PROFILES["k26-topology"], layers=6, shards=6)
    layout = synthesize(tmp_path_factory.mktemp("k26-6") / "k26-6", profile, seed=1, progress=False, layout_only=True)
    return build_plan(LocalDir(layout), load_recipe("amd-kimi-mxfp4"))


def test_the_split_is_chosen_only_when_the_workers_outnumber_the_jobs(plan, k26_six_layers):
    jobs = k26_six_layers.jobs
    assert len(jobs) == 7 and [expert_groups_for(jobs, w) for w in (0, 1, 3, 7)] == [1, 1, 1, 1]
    chosen = {w: expert_groups_for(jobs, w) for w in (8, 12, 16, 32)}
    assert chosen == {8: 4, 12: 2, 16: 6, 32: 13}
    shapes = job_shapes(jobs)
    for w, parts in chosen.items():  # no other candidate finishes sooner on w workers, none as soon with fewer groups
        best = simulate(split_sizes(shapes, parts), w).makespan
        for p in candidate_parts(w, 5):
            wall = simulate(split_sizes(shapes, p), w).makespan
            assert wall >= best * (1 - 1e-9) and (p >= parts or wall > best * (1 + 1e-9)), (w, p)
    # tiny's experts are a sliver of each layer: no split shortens its wall, so it stays whole on any cluster
    assert {expert_groups_for(plan.jobs, w) for w in (5, 8, 64)} == {1}


def test_a_split_plan_is_another_run_and_cannot_be_split_twice(plan):
    from requant.run.records import run_key

    split = split_plan(plan, 3)
    assert split.expert_groups == 3 and split_plan(plan, 1) is plan and split_plan(split, 3) is split
    assert [j.name for j in split.jobs] == [j.name for j in split_jobs(plan.jobs, 3)]
    assert run_key(split, "r") != run_key(plan, "r") != run_key(split_plan(plan, 2), "r")
    with pytest.raises(ValueError, match="already split"):
        split_plan(split, 2)


def test_convert_local_with_expert_groups_publishes_a_verified_checkpoint_of_the_same_tensors(tiny_upstream,
                                                                                           tmp_path, capsys):
    import json

    import requant
    from requant.cli import main

    assert main(["convert", str(tiny_upstream), str(tmp_path / "split"), "--recipe", "amd-kimi-mxfp4", "--local",
                 "--expert-groups", "3"]) == 0
    assert "in 10 shards" in capsys.readouterr().out
    whole = requant.convert(str(tiny_upstream), str(tmp_path / "whole"), "amd-kimi-mxfp4", progress=False)
    split = json.loads((tmp_path / "split" / "requant-manifest.json").read_text())
    assert requant.verify(str(tmp_path / "split")).files == requant.verify(whole.output).files + 6
    assert split["upstream"]["run_key"] != whole.run_key
    assert split["tensors"].keys() == whole.manifest["tensors"].keys()
    whole_tensors, split_tensors = _tensors(tmp_path / "whole"), _tensors(tmp_path / "split")
    assert all(torch.equal(t.view(torch.uint8), split_tensors[n].view(torch.uint8)) for n, t in whole_tensors.items())
