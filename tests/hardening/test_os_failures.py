"""Real failures of the machine and of the object store, each injected while a conversion runs or as it
starts: two writers on one output, kill -9 then the same command again, a disk that fills up mid-run, too
little space, a read-only destination, permission denied, missing or small scratch space, refused S3
credentials, a missing bucket. Each must give one line naming the path or URI and the cause, exit status 2,
nothing published that looks complete, and (where work was done) a rerun that resumes to the same bytes.

Small file systems are real tmpfs mounts (the suite runs as root, like CI); permission checks run the CLI
with CAP_DAC_OVERRIDE dropped, since root ignores permission bits otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hardening_support import MOUNTS, scale, unmount
from waiting import wait_for

import requant
from requant.errors import SystemFailure
from requant.io.s3 import S3Storage
from requant.testing import seaweed
from requant.testing.synth import PROFILES, synthesize

COMPARED_SUFFIXES = (".safetensors", "config.json", "model.safetensors.index.json")


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """k26-topology cut to 6 layers: 7 layer jobs, ~6 s per local conversion, enough to interrupt."""
    profile = dataclasses.replace(PROFILES["k26-topology"], layers=6, shards=6)
    return synthesize(tmp_path_factory.mktemp("os-medium") / "k26-6", profile, seed=1, progress=False)


@pytest.fixture(scope="module")
def references(medium, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("os-ref")
    for recipe in ("kimi-k2.6-mxfp4", "amd-kimi-mxfp4"):
        requant.convert(str(medium), str(root / recipe), recipe, progress=False)
    return {recipe: root / recipe for recipe in ("kimi-k2.6-mxfp4", "amd-kimi-mxfp4")}


def _start(src: Path, dst: Path, recipe: str = "kimi-k2.6-mxfp4", preexec=None, jobs: int | None = None
           ) -> subprocess.Popen:
    extra = ["--jobs", str(jobs)] if jobs else []
    return subprocess.Popen([sys.executable, "-m", "requant.cli", "convert", str(src), str(dst), "--recipe", recipe,
                             "--local", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one `requant convert: error:` line, no traceback, naming every needle."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err[-2000:]
    assert len(errors) == 1 and errors[0].startswith("requant convert: error: "), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _same_bytes(out: Path, ref: Path) -> None:
    names = sorted(p.name for p in ref.iterdir() if p.name.endswith(COMPARED_SUFFIXES))
    assert names and sorted(p.name for p in out.iterdir() if p.name.endswith(COMPARED_SUFFIXES)) == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def _records(dst: Path) -> list[Path]:
    return list(dst.parent.glob(f".{dst.name}.partial-*/.requant/runs/*/*.json"))


def _leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def _wait_for(predicate, timeout: float, what: str):
    return wait_for(predicate, timeout, what, interval=0.02)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` at ``path``, unmounted (not lazily: checked gone from /proc/mounts) on the way out,
    also when the test fails or the run is interrupted (hardening_support.unmount_all at session end)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.fail(f"these tests mount a small tmpfs and need root with mount rights: {mounted.stderr.strip()}")
    MOUNTS.add(path)
    try:
        yield path
    finally:
        unmount(path)


def _drop_dac_override() -> None:
    """preexec: drop the capabilities that let root ignore file permissions, for the exec'd CLI."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# --- one writer per output -----------------------------------------------------------------------------
def test_two_writers_on_one_output_one_wins_the_other_is_refused(medium, references, tmp_path, ledger):
    rng = random.Random(3)
    for trial in range(scale(2, 6)):
        dst = tmp_path / f"same-{trial}"
        first, second = rng.sample(sorted(references), 2)
        a = _start(medium, dst, first)
        time.sleep(rng.uniform(0.0, 1.0))
        b = _start(medium, dst, second)
        (rc_a, _, err_a), (rc_b, _, err_b) = _finish(a), _finish(b)
        assert sorted([rc_a, rc_b]) == [0, 2], (err_a[-1500:], err_b[-1500:])
        winner, (loser_err, loser_rc) = (first, (err_b, rc_b)) if rc_a == 0 else (second, (err_a, rc_a))
        line = _one_line_error(loser_rc, loser_err, str(dst))
        assert "another run is writing this output" in line or "took this output first" in line, line
        assert "pid" in line and "run " in line                       # names the holder
        manifest = json.loads((dst / "requant-manifest.json").read_text())
        assert manifest["recipe"]["name"] == winner                  # the output is what the winner reported
        _same_bytes(dst, references[winner])
        assert _leftovers(dst) == []
        ledger.record("local: two conversions into one output", "one wrote it, the other refused naming the holder")


def test_lease_race_between_processes_has_one_winner(tmp_path, ledger):
    """Eight processes take the same lease at the same moment (their attempts start within half a second of each
    other): exactly one gets it. The winner holds it until every answer is in, so no late process can win
    after it let go."""
    code = ("import sys, time; from requant.io.storage import LocalDir; from requant.lease import Lease, LeaseHeld\n"
            "start = float(sys.argv[2])\n"
            "while time.time() < start: pass\n"
            "t = time.time()\n"
            "try:\n    Lease(LocalDir(sys.argv[1]), 'lease', 'k', 'out').acquire(); print('won', t, flush=True)\n"
            "    time.sleep(120)\n"
            "except LeaseHeld as exc: print('refused', t, flush=True)\n")
    for trial in range(scale(2, 5)):
        root = tmp_path / f"race-{trial}"
        root.mkdir()
        start = time.time() + 3
        procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(start)], stdout=subprocess.PIPE, text=True)
                 for _ in range(8)]
        try:
            lines = [p.stdout.readline().split() for p in procs]    # the winner answers, then keeps holding
        finally:
            for p in procs:
                p.kill()
                p.communicate()
        assert sorted(answer for answer, _ in lines) == ["refused"] * 7 + ["won"], lines
        times = [float(t) for _, t in lines]
        assert max(times) - min(times) < 0.5, f"the attempts did not overlap: {times}"
        ledger.record("lease: 8 processes race for one output", "exactly one won")


# --- kill -9, then the same command ---------------------------------------------------------------------
def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The conversion's worker processes (multiprocessing's spawn children), from the process tree we started."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
    return out


def test_kill9_of_a_parallel_conversion_kills_its_workers_and_the_same_command_resumes(medium, references, tmp_path,
                                                                                        ledger):
    """`requant convert --local --jobs 2` killed with SIGKILL (the parent alone, as the OOM killer would) after a
    few layer jobs: the kill landed (exit -SIGKILL), every worker process dies with it (by PID, none left writing
    into the staging a rerun resumes), and the same command resumes the finished jobs to the same bytes."""
    rng = random.Random(5)
    counted = attempts = 0
    while counted < scale(2, 6):
        attempts += 1
        assert attempts <= 12, "the conversion kept finishing before the kill"
        dst = tmp_path / f"k9-{attempts}"
        proc = _start(medium, dst, jobs=2)
        want = rng.randint(1, 5)
        workers: list[psutil.Process] = []

        def ready(proc=proc, dst=dst, want=want, seen=workers) -> bool:
            seen[:] = _workers(proc) or seen
            return (len(_records(dst)) >= want and len(seen) == 2) or proc.poll() is not None

        try:
            _wait_for(ready, 120, "finished layer jobs and two workers")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
            # Surviving workers hold the parent's stdout: find them before reading it, then make sure they go.
            _, alive = psutil.wait_procs(workers, timeout=15)
            for survivor in alive:
                with contextlib.suppress(psutil.Error):
                    survivor.kill()
            proc.communicate()
        if proc.returncode == 0:
            continue                                       # finished first: no fault injected, not counted
        assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}, not the injected kill"
        assert len(workers) == 2, workers
        assert not alive, f"workers {[p.pid for p in alive]} outlived their killed parent"
        finished = len(_records(dst))
        assert not dst.exists() and finished >= 1          # nothing looks complete; finished work is staged
        rc, out, err = _finish(_start(medium, dst, jobs=2))
        assert rc == 0, err[-2000:]
        assert f"({finished} of 7 layer jobs resumed" in out, out
        _same_bytes(dst, references["kimi-k2.6-mxfp4"])
        assert _leftovers(dst) == []                       # staging and lease gone
        counted += 1
        ledger.record("local: kill -9 mid-run (--jobs 2), then the same command",
                      f"workers died with it; resumed {finished}/7 jobs, byte-identical")


def test_staging_of_another_run_key_is_removed(medium, references, tmp_path):
    dst = tmp_path / "other-key"
    proc = _start(medium, dst, "amd-kimi-mxfp4")
    _wait_for(lambda: _records(dst) or proc.poll() is not None, 120, "a finished layer job")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert len(_leftovers(dst)) >= 1
    rc, out, err = _finish(_start(medium, dst, "kimi-k2.6-mxfp4"))
    assert rc == 0 and "resumed" not in out, err[-2000:]
    _same_bytes(dst, references["kimi-k2.6-mxfp4"])
    assert _leftovers(dst) == []


# --- space ----------------------------------------------------------------------------------------------
def test_disk_filling_up_mid_run_is_one_clear_error_then_resumes(medium, references, tmp_path, ledger):
    counted = attempts = 0
    while counted < scale(1, 3):
        attempts += 1
        assert attempts <= 6, "the conversion kept finishing before the disk filled"
        with tmpfs(tmp_path / f"small-{attempts}", "40m") as fs:
            dst, filler = fs / "out", fs / "filler"
            proc = _start(medium, dst)
            _wait_for(lambda: _records(dst) or proc.poll() is not None, 120,  # noqa: B023 (waited on at once)
                      "a finished layer job")
            with open(filler, "wb") as f:               # another process fills the disk
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
            rc, out, err = _finish(proc)
            if rc == 0:
                continue
            _one_line_error(rc, err, str(fs), "No space left on device (ENOSPC)")
            assert not dst.exists() and _records(dst)       # nothing published; finished jobs kept for a rerun
            filler.unlink()
            rc, out, err = _finish(_start(medium, dst))
            assert rc == 0 and "layer jobs resumed" in out, err[-2000:]
            _same_bytes(dst, references["kimi-k2.6-mxfp4"])
            counted += 1
            ledger.record("local: disk full mid-run", "one-line ENOSPC, exit 2, nothing published; rerun resumed")


def test_too_little_space_fails_before_writing(medium, tmp_path, ledger):
    with tmpfs(tmp_path / "tiny-fs", "4m") as fs:
        rc, _, err = _finish(_start(medium, fs / "out"))
        _one_line_error(rc, err, str(fs / "out"), "not enough free space", "MB available on")
        assert sorted(p.name for p in fs.iterdir()) == []
    ledger.record("local: too little space at the start", "refused before writing, needed and available named")


def test_read_only_destination(medium, tmp_path, ledger):
    with tmpfs(tmp_path / "ro-fs", "64m") as fs:
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        rc, _, err = _finish(_start(medium, fs / "out"))
        _one_line_error(rc, err, str(fs), "Read-only file system (EROFS)")
    ledger.record("local: read-only destination", "one line, EROFS, exit 2")


def test_permission_denied(medium, tmp_path, ledger):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        rc, _, err = _finish(_start(medium, parent / "out", preexec=_drop_dac_override))
        _one_line_error(rc, err, str(parent), "Permission denied (EACCES)")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)
    ledger.record("local: permission denied", "one line, EACCES, exit 2")


def test_layer_job_scratch_space_missing_or_small(medium, tmp_path, monkeypatch, ledger):
    """A flow worker's layer job checks its scratch space before converting (the flow's workers run this)."""
    from requant.io.storage import LocalDir
    from requant.planning import build_plan
    from requant.recipe import load_recipe
    from requant.run import execute_job

    job = build_plan(LocalDir(medium), load_recipe("kimi-k2.6-mxfp4")).jobs[2]
    dest = tmp_path / "dest"
    monkeypatch.setenv("REQUANT_SCRATCH", str(tmp_path / "no-such-scratch"))
    with pytest.raises(SystemFailure, match="scratch directory does not exist"):
        execute_job(job, str(medium), str(dest), "k")
    with tmpfs(tmp_path / "small-scratch", "1m") as fs:
        monkeypatch.setenv("REQUANT_SCRATCH", str(fs))
        with pytest.raises(SystemFailure, match=rf"not enough scratch space for {job.name}: needs .* MB available"):
            execute_job(job, str(medium), str(dest), "k")
    assert not dest.exists() or list(dest.rglob("*")) == []
    ledger.record("flow job: scratch missing / too small", "refused before converting (2 cases)")


# --- object store ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory, tiny_upstream):
    server = seaweed.start(tmp_path_factory.mktemp("seaweed-os"), access_key="hardening", secret_key="right-secret")
    try:  # stopped even when the set-up below fails
        with seaweed.exported_env(server):
            out = tmp_path_factory.mktemp("os-s3") / "mx"
            requant.convert(str(tiny_upstream), str(out), "kimi-k2.6-mxfp4", progress=False)
            dest = S3Storage("s3://published/mx")
            dest.ensure_bucket()
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    dest.put_file(path.relative_to(out).as_posix(), path)
            yield server
    finally:
        seaweed.stop(server)


def _cli(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "requant.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env})
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("identity", [("hardening", "wrong-secret"), ("nobody", "right-secret")])
def test_refused_s3_credentials_are_one_clear_line(s3, identity, ledger):
    key, secret = identity
    rc, err = _cli(["verify", "s3://published/mx"], {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret})
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "s3://published/mx" in errors[0] and "credentials refused by the object store" in errors[0], errors[0]
    # HEAD answers carry no body, so the store's code is the HTTP status there; GETs name the reason
    assert any(f"({code})" in errors[0] for code in ("403", "SignatureDoesNotMatch", "InvalidAccessKeyId")), errors[0]
    assert secret not in err
    ledger.record("s3: credentials refused", "one line naming the URI and the code, exit 2")


def test_missing_bucket_is_one_clear_line(s3, ledger):
    rc, err = _cli(["verify", "s3://no-such-bucket/mx"], {})
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "bucket 'no-such-bucket' does not exist" in errors[0], errors[0]
    assert _cli(["verify", "s3://published/mx"], {})[0] == 0          # the same command with a real bucket
    ledger.record("s3: bucket missing", "one line naming the bucket, exit 2")


def test_s3_lease_second_writer_refused_and_stale_lease_taken_over(s3, ledger):
    from requant.lease import Holder, Lease, LeaseHeld, LeaseLost
    from requant.run import LEASE_DIR, output_lease

    uri = "s3://outputs/leased"
    with output_lease(uri, "run-a") as held:
        with pytest.raises(LeaseHeld, match=r"another run is writing this output \(run run-a on host .*pid"):
            output_lease(uri, "run-b").acquire()
    # a holder on another host whose heartbeat stopped long ago: stale, taken over
    store = S3Storage(uri)
    dead = Holder(7, "run-dead", "gone-host", "boot", 1, 0.0, time.time() - 900, time.time() - 900, 120.0)
    store.put_bytes(f"{LEASE_DIR}/{7:012d}.json", json.dumps(dataclasses.asdict(dead)).encode())
    with output_lease(uri, "run-c") as taker:
        assert taker.generation == 8 and taker.took_over.run_key == "run-dead"
        assert not store.exists(f"{LEASE_DIR}/{7:012d}.json")
    # a live holder on another host (fresh heartbeat) is respected
    alive = dataclasses.replace(dead, run_key="run-live", heartbeat=time.time())
    store.put_bytes(f"{LEASE_DIR}/{9:012d}.json", json.dumps(dataclasses.asdict(alive)).encode())
    with pytest.raises(LeaseHeld, match="run-live on host gone-host"):
        output_lease(uri, "run-d").acquire()
    # a holder that was presumed dead and taken over learns it before publishing
    store.delete(f"{LEASE_DIR}/{9:012d}.json")
    zombie = output_lease(uri, "run-e").acquire()
    store.put_bytes(f"{LEASE_DIR}/{zombie.generation + 1:012d}.json", b"{}")
    with pytest.raises(LeaseLost, match="another run took over"):
        zombie.check()
    zombie.release()
    assert isinstance(held, Lease)
    ledger.record("s3: output lease", "second writer refused, stale taken over, live respected, loser stops")


def test_a_process_can_switch_object_store_identities(s3, tmp_path):
    """boto3's default session keeps the first credentials it resolves; requant's clients follow the AWS_*
    variables as they are now (a worker, or this test session, moving between two stores)."""
    other = seaweed.start(tmp_path / "other-store", access_key="second", secret_key="second-secret")
    try:
        assert S3Storage("s3://published/mx").exists("requant-manifest.json")        # s3's identity
        with seaweed.exported_env(other):
            store = S3Storage("s3://second/x")
            store.ensure_bucket()
            store.put_bytes("ping", b"ok")
            assert store.read_bytes("ping") == b"ok"
        assert S3Storage("s3://published/mx").exists("requant-manifest.json")        # and back
    finally:
        seaweed.stop(other)
