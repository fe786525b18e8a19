"""``convert --local`` on every core: transcode threads and worker processes write the same bytes as one thread
and fail the same way on bad input. A real ``convert --local --jobs 2`` killed mid-run, its workers dying with it
and the rerun resuming, is in tests/hardening/test_os_failures.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import requant
from requant.cli import main
from requant.io.safetensors import sha256_file
from requant.io.storage import LocalDir
from requant.planning import build_plan
from requant.recipe import load_recipe
from requant.run import parallel_jobs


def _shards(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("recipe", ["kimi-k2.6-mxfp4", "fp8-reference"])
def test_threads_and_worker_processes_write_the_same_bytes(tiny_upstream, tmp_path, recipe):
    runs = {}
    for threads, jobs in ((1, 1), (3, 1), (2, 2)):
        out = tmp_path / f"out-{threads}-{jobs}"
        manifest = requant.convert(str(tiny_upstream), str(out), recipe, progress=False, threads=threads, jobs=jobs).manifest
        runs[(threads, jobs)] = (_shards(out), manifest["outputs"], manifest["tensors"])
    first = runs[(1, 1)]
    assert len(first[0]) == 4
    for key, run in runs.items():
        assert run == first, key


def test_parallel_jobs_are_sized_to_the_work(tiny_upstream):
    todo = build_plan(LocalDir(tiny_upstream), load_recipe("kimi-k2.6-mxfp4")).jobs
    assert parallel_jobs(todo) == 1  # 4 jobs: worker processes would cost more than they save
    assert parallel_jobs(todo, requested=2) == 2 and parallel_jobs(todo, requested=64) == len(todo)


def test_bad_input_in_a_worker_process_fails_in_one_line_and_leaves_nothing(tiny_upstream, tmp_path, capsys):
    import shutil

    from test_bad_input import inf_in_scale

    up = tmp_path / "up"
    shutil.copytree(tiny_upstream, up)
    file, tensor = inf_in_scale(up)
    out = tmp_path / "out"
    rc = main(["convert", str(up), str(out), "--recipe", "kimi-k2.6-mxfp4", "--local", "--jobs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert rc == 2 and len(errors) == 1 and file in errors[0] and tensor in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
