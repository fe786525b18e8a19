"""``convert --local`` on every core: transcode threads and worker processes write the same bytes as one thread,
fail the same way on bad input, and leave no worker behind when the conversion is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from requant.cli import main
from requant.convert import convert_local, parallel_jobs
from requant.io.safetensors import sha256_file
from requant.io.storage import LocalDir
from requant.plan import build_plan
from requant.recipe import load_recipe


def _shards(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("recipe", ["kimi-k2.6-mxfp4", "fp8-reference"])
def test_threads_and_worker_processes_write_the_same_bytes(tiny_upstream, tmp_path, recipe):
    runs = {}
    for threads, jobs in ((1, 1), (3, 1), (2, 2)):
        out = tmp_path / f"out-{threads}-{jobs}"
        manifest = convert_local(str(tiny_upstream), str(out), recipe, progress=False, threads=threads, jobs=jobs)
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


def test_workers_die_with_a_killed_conversion(tmp_path):
    """A conversion killed with SIGKILL cannot stop its workers itself: they must die with it (the kernel's
    parent-death signal), not go on writing into a staging directory that a rerun resumes."""
    script = textwrap.dedent("""
        import multiprocessing, os, sys, time
        from concurrent.futures import ProcessPoolExecutor
        from requant.convert import _worker_init
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                   initargs=(os.getpid(),))
        print(pool.submit(os.getpid).result(), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        worker = int(parent.stdout.readline())
        os.kill(worker, 0)  # alive
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.1)
        assert not _alive(worker), f"worker {worker} outlived its killed parent"
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, waiting to be reaped by init
