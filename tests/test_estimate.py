"""``requant plan --estimate``: the projection's model on hand-counted cases, and the command's output and refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from requant.cli import main
from requant.estimate import Fleet, Measured, estimate, measured_from_layer_results, sized_for
from requant.io.storage import LocalDir
from requant.planning import build_plan
from requant.recipe import load_recipe

LAYER_RESULTS = Path(__file__).resolve().parents[1] / "results" / "layer.json"
MEASURED = Measured(job_mb_s_1=100.0, job_mb_s_n=160.0, threads=2, peak_rss_mb_1=1000.0, peak_rss_mb_n=1100.0,
                    where="by hand")


@pytest.fixture(scope="module")
def plan(tiny_upstream):
    return build_plan(LocalDir(tiny_upstream), load_recipe("amd-kimi-mxfp4"))


def test_a_workers_rate_follows_amdahl_through_the_two_measured_points():
    assert MEASURED.parallel_share == pytest.approx(0.75)  # 1.6x on 2 threads: 1 / (0.25 + 0.75 / 2)
    assert MEASURED.rate_mb_s(1) == pytest.approx(100.0) and MEASURED.rate_mb_s(2) == pytest.approx(160.0)
    assert MEASURED.rate_mb_s(16) == pytest.approx(100 / (0.25 + 0.75 / 16))
    assert MEASURED.rate_mb_s(10**6) < 400.0  # never past 1 / (1 - p) of one thread
    assert MEASURED.peak_rss_mb(16) == pytest.approx(1000 + 100 * 15)


def test_without_a_storage_limit_the_wall_is_the_schedule_at_the_workers_rate(plan):
    rate = MEASURED.rate_mb_s(2) * 1e6
    result = estimate(plan, Fleet(workers=len(plan.jobs), cores=2), MEASURED)
    largest = max(job.bytes_in for job in plan.jobs)
    assert result.wall_s == pytest.approx(largest / rate) and result.longest_job_s == pytest.approx(largest / rate)
    assert result.storage_bound_share == 0.0 and result.expert_groups == 1 and result.jobs == len(plan.jobs)
    busy = sum(job.bytes_in for job in plan.jobs) / rate
    assert result.idle_share == pytest.approx(1 - busy / (len(plan.jobs) * result.wall_s))
    one = estimate(plan, Fleet(workers=1, cores=2), MEASURED)
    assert one.wall_s == pytest.approx(busy) and one.idle_share == pytest.approx(0.0, abs=1e-9)


def test_slow_storage_sets_the_pace_moving_every_input_and_output_byte(plan):
    storage = 1e5  # 0.0001 GB/s: far below any worker
    traffic = sum(job.bytes_in + job.bytes_out for job in plan.jobs)
    for workers in (1, 2, len(plan.jobs)):  # shared evenly, so the total traffic over the pool, whoever runs
        result = estimate(plan, Fleet(workers=workers, cores=1, storage_gb_s=storage / 1e9), MEASURED)
        if workers < len(plan.jobs):
            assert result.wall_s >= traffic / storage * (1 - 1e-9)
        assert result.storage_bound_share == pytest.approx(1.0)
    one = estimate(plan, Fleet(workers=1, cores=1, storage_gb_s=storage / 1e9), MEASURED)
    assert one.wall_s == pytest.approx(traffic / storage)
    assert any("shared evenly" in a for a in one.assumptions)


def test_the_estimate_splits_as_the_flow_would(k26_six_layers_layout):
    whole = build_plan(LocalDir(k26_six_layers_layout), load_recipe("amd-kimi-mxfp4"))
    assert sized_for(whole, 7) is whole
    split = sized_for(whole, 12)
    assert split.expert_groups == 2 and len(split.jobs) == 13  # 5 MoE layers and the non-layer job in 2
    assert estimate(split, Fleet(12, 1), MEASURED).wall_s < estimate(whole, Fleet(12, 1), MEASURED).wall_s


@pytest.fixture(scope="module")
def k26_six_layers_layout(tmp_path_factory):
    import dataclasses

    from requant.testing.synth import PROFILES, synthesize

    profile = dataclasses.replace(PROFILES["k26-topology"], layers=6, shards=6)
    return synthesize(tmp_path_factory.mktemp("k26-6") / "k26-6", profile, seed=1, progress=False, layout_only=True)


def test_the_measurements_come_from_make_bench_layers_results():
    measured = measured_from_layer_results(LAYER_RESULTS)
    data = json.loads(LAYER_RESULTS.read_text())
    job = data["tmpfs"]["stages"]["2"]["largest_job"]
    assert math.isclose(measured.job_mb_s_n, job["bytes_in"] / job["seconds"] / 1e6)
    assert measured.threads == 2 and measured.peak_rss_mb_n == data["tmpfs"]["requant"]["peak_rss_mb"]
    assert data["run"]["commit"][:7] in measured.where and data["run"]["date"] in measured.where


def test_requant_plan_estimate_prints_the_projection_and_its_assumptions(tiny_upstream, capsys):
    assert main(["plan", str(tiny_upstream), "--recipe", "amd-kimi-mxfp4", "--estimate", "--workers", "4",
                 "--cores", "8", "--storage-gb-s", "2", "--layer-results", str(LAYER_RESULTS)]) == 0
    out = capsys.readouterr().out
    assert "4 jobs with recipe amd-kimi-mxfp4" in out and "estimate: 4 workers of 8 cores, 2 GB/s of storage" in out
    for line in ("wall time", "per worker", "storage-bound", "assumptions:", "Amdahl", "peak memory per worker"):
        assert line in out, line
    assert main(["plan", str(tiny_upstream), "--recipe", "amd-kimi-mxfp4", "--expert-groups", "3"]) == 0
    assert "10 jobs with recipe amd-kimi-mxfp4, split in 3 (each MoE layer by experts" in capsys.readouterr().out


def test_requant_plan_refuses_missing_or_foreign_results_in_one_line(tiny_upstream, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    for path, message in ((tmp_path / "absent.json", "no make bench-layer results to estimate from"),
                          (other, "not the results of make bench-layer (KeyError")):
        assert main(["plan", str(tiny_upstream), "--recipe", "amd-kimi-mxfp4", "--estimate",
                     "--layer-results", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and message in err[0], err
    with pytest.raises(SystemExit):
        main(["plan", str(tiny_upstream), "--recipe", "amd-kimi-mxfp4", "--workers", "0"])
    assert "--workers: must be at least 1" in capsys.readouterr().err


def test_requant_plan_reads_a_hub_upstream_by_its_headers_alone(local_hub, tiny_upstream, capsys):
    seen = len(local_hub.server.requests)
    assert main(["plan", "hf://testorg/tiny@main", "--recipe", "amd-kimi-mxfp4", "--estimate", "--workers", "2",
                 "--layer-results", str(LAYER_RESULTS)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hf://testorg/tiny@main: 4 jobs with recipe amd-kimi-mxfp4") and "wall time" in out
    shard_reads = [r for r in local_hub.server.requests[seen:] if r.path.startswith("/lfs-storage/")]
    assert shard_reads and all(r.range is not None for r in shard_reads)  # headers only, never a whole shard
    assert sum(int(r.range.split("-")[1]) - int(r.range.split("=")[1].split("-")[0]) + 1 for r in shard_reads) < \
        sum(p.stat().st_size for p in tiny_upstream.glob("*.safetensors")) / 4
