"""``requant bench --layer`` / ``make bench-layer``: Kimi-K2.6's real widths, each path against its own roofline
measured in the same run.

The fixture is ``synth --profile k26-layer`` (layer 0 dense with intermediate 18432, one MoE layer of 2048x7168
INT4 experts, real MLA). Per location (a disk directory, tmpfs):

- roofline: copy the input shards, fsync and sha256 the copies (requant fsyncs each shard too), with the same sha256 requant uses (OpenSSL through
  hashlib) and, for reference, coreutils ``cp`` + ``sha256sum`` (several times slower on CPUs with SHA
  extensions: it does not use them);
- ``requant convert --local`` with default settings (every core) and pinned to one core.

Through S3 (SeaweedFS on loopback, its data on the disk): the roofline is a concurrent GET of the input shards
and PUT of the same number of bytes through boto3's transfer manager; then the requantize flow with 1 and 2 local
Ray workers. Every measured command runs in its own process: wall time, CPU time and its own peak RSS.

On one machine the S3 server shares the cores with the conversion, so the S3 runs also record where the CPU
time went (:mod:`requant.bench.cpu`: the S3 server, the flow's driver, Ray's workers and services, Prefect's
server) and the machine's busy share. From them, a shared-CPU bound for the flow: the S3 server's CPU time for
moving the bytes (the roofline's) plus the conversion's own (``convert --local`` on one core), over the cores.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from requant.bench.conversion import _run_measured
from requant.bench.cpu import CpuSampler, ray_part
from requant.job import available_cores

LAYER_RECIPE = "amd-kimi-mxfp4"  # AMD's published recipe: every routed expert to MXFP4, attention and dense MLP kept

_COPY_SHA = """
import hashlib, os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in sorted(src.glob("*.safetensors")):
    shutil.copyfile(f, dst / f.name)
    with open(dst / f.name, "rb") as fh:
        os.fsync(fh.fileno())  # on stable storage, as requant's shards are before it records them done
        digest = hashlib.sha256()
        while block := fh.read(8 << 20):
            digest.update(block)
"""


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in _shards(path))


def local_bench(upstream: Path, work: Path, recipe: str = LAYER_RECIPE) -> dict[str, Any]:
    """Roofline and conversions of ``upstream`` with outputs under ``work`` (same file system as measured)."""
    size = _bytes(upstream)
    out: dict[str, Any] = {"bytes_in": size, "where": str(work)}
    copy = work / "copy"
    out["roofline"] = _run_measured([sys.executable, "-c", _COPY_SHA, str(upstream), str(copy)])
    shutil.rmtree(copy)
    files = " ".join(f"'{f}'" for f in _shards(upstream))
    out["roofline_coreutils"] = _run_measured(["bash", "-c", f"mkdir -p '{copy}' && cp {files} '{copy}/' && "
                                                             f"sync '{copy}'/*.safetensors && sha256sum '{copy}'/*.safetensors > /dev/null"])
    shutil.rmtree(copy)
    convert = [sys.executable, "-m", "requant.cli", "convert", str(upstream), str(work / "out"), "--recipe", recipe,
               "--local", "--overwrite"]
    out["requant"] = _run_measured(convert)
    out["bytes_out"] = _bytes(work / "out")
    shutil.rmtree(work / "out")
    out["requant_1_core"] = _run_measured(["taskset", "-c", str(min(os.sched_getaffinity(0))), *convert])
    shutil.rmtree(work / "out")
    for name in ("requant", "requant_1_core"):
        r = out[name]
        r["mb_per_s_in"] = size / 1e6 / r["seconds"]
        r["of_roofline"] = out["roofline"]["seconds"] / r["seconds"]
        r["of_roofline_coreutils"] = out["roofline_coreutils"]["seconds"] / r["seconds"]
    out["all_cores_speedup"] = out["requant_1_core"]["seconds"] / out["requant"]["seconds"]
    return out


def s3_roofline(upstream: str, scratch: str, files: list[str], local: Path, server_pid: int) -> dict[str, Any]:
    """GET every input shard while PUTting the same bytes (from ``local``) under ``scratch``, both through
    boto3's transfer manager (multipart, several connections each), at the same time; with the CPU time of
    this process (the client) and of the S3 server."""
    from boto3.s3.transfer import TransferConfig

    from requant.io.s3 import MULTIPART_CHUNK, S3Storage

    src, dst = S3Storage(upstream), S3Storage(scratch)
    dst.ensure_bucket()
    config = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK)
    errors: list[BaseException] = []

    class Sink(io.RawIOBase):
        """Discards what it is given: a seekable file to the transfer manager, which writes parts at offsets."""

        def __init__(self) -> None:
            self.position = 0

        def writable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def write(self, data) -> int:
            self.position += len(data)
            return len(data)

        def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
            self.position = offset if whence == io.SEEK_SET else self.position + offset
            return self.position

        def tell(self) -> int:
            return self.position

    def get() -> None:
        try:
            for f in files:
                src.s3.download_fileobj(src.bucket, src.key(f), Sink(), Config=config)
        except BaseException as exc:  # noqa: BLE001 - reported after both finished
            errors.append(exc)

    def put() -> None:
        try:
            for f in files:
                dst.s3.upload_file(str(local / f), dst.bucket, dst.key(f), Config=config)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=get), threading.Thread(target=put)]
    with CpuSampler({"s3 server": server_pid, "client (boto3)": os.getpid()}) as cpu:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    size = sum((local / f).stat().st_size for f in files)
    return {"bytes": size, "seconds": seconds, "mb_per_s_in": size / 1e6 / seconds, "cpu": cpu.summary()}


_RUN_FLOW = """
import json, sys
from flows.requantize import requantize, start_ephemeral_server
start_ephemeral_server()
print("RESULT " + json.dumps(requantize(upstream=sys.argv[1], output=sys.argv[2], recipe=sys.argv[3], progress=False,
                                        evaluate=False)))
"""


def measured_flow_run(upstream: str, output: str, recipe: str, workers: int, env: dict[str, str],
                      server_pid: int) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """One requantize flow (no evaluation) in a fresh process with a fresh local Ray of ``workers`` CPUs: its
    summary, process wall seconds, and where the CPU time went (with the S3 server's)."""
    run_env = dict(env, REQUANT_RAY_CPUS=str(workers))
    run_env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _RUN_FLOW, upstream, output, recipe],
                            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with CpuSampler({"flow driver": proc.pid, "s3 server": server_pid}, classify=ray_part) as cpu:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"flow with {workers} workers failed:\n{stdout[-2000:]}{stderr[-3000:]}")
    summary = json.loads(next(li for li in stdout.splitlines() if li.startswith("RESULT "))[7:])
    return summary, wall, cpu.summary()


def s3_bench(upstream_dir: Path, work: Path, workers: list[int], recipe: str = LAYER_RECIPE,
             convert_cpu_seconds: float | None = None) -> dict[str, Any]:
    """The roofline and the flow runs through one SeaweedFS. ``convert_cpu_seconds``: the conversion's own CPU
    time (``convert --local`` on one core), for the shared-CPU bound."""
    from requant import seaweed
    from requant.io.transfer import upload_dir

    server = seaweed.start(work / "seaweed")
    env = dict(os.environ, **server.env())
    saved = dict(os.environ)
    os.environ.update(server.env())
    try:
        upstream = "s3://bench/upstream"
        upload_dir(upstream_dir, upstream)
        files = [f.name for f in _shards(upstream_dir)]
        out: dict[str, Any] = {"bytes_in": _bytes(upstream_dir),
                               "roofline": s3_roofline(upstream, "s3://bench/copy", files, upstream_dir, server.pid),
                               "flow": {}}
        if convert_cpu_seconds is not None:
            server_cpu = out["roofline"]["cpu"]["cpu_seconds"].get("s3 server", 0.0)
            out["shared_cpu_bound_seconds"] = max(out["roofline"]["seconds"],
                                                  (server_cpu + convert_cpu_seconds) / available_cores())
        for n in workers:
            summary, wall, cpu = measured_flow_run(upstream, f"s3://bench/out-{n}", recipe, n, env, server.pid)
            t = summary["timings"]
            run = {"process_seconds": wall, "timings": t, "cpu": cpu,
                   "mb_per_s_in": out["bytes_in"] / 1e6 / t["total"],
                   "jobs_mb_per_s_in": out["bytes_in"] / 1e6 / t["jobs"],
                   "of_roofline": out["roofline"]["seconds"] / t["jobs"]}
            if "shared_cpu_bound_seconds" in out:
                run["of_shared_cpu_bound"] = out["shared_cpu_bound_seconds"] / t["jobs"]
            out["flow"][str(n)] = run
        runs = [out["flow"][str(n)]["timings"]["total"] for n in workers]
        out["scaling"] = runs[0] / runs[-1] if len(runs) > 1 else None
        return out
    finally:
        os.environ.clear()
        os.environ.update(saved)
        seaweed.stop(server)


def render(results: dict[str, Any]) -> str:
    f = results["fixture"]
    lines = [f"## One Kimi-K2.6 layer at real widths: {f['experts']} routed experts, {f['bytes'] / 1e9:.2f} GB in, "
             f"recipe {results['recipe']}", "",
             "| where | path | wall s | MB/s in | CPU % | peak RSS MB | of roofline (OpenSSL sha256) | "
             "of roofline (cp + sha256sum) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for where in ("tmpfs", "disk"):
        r = results.get(where)
        if not r:
            continue
        for label, key in (("copy + sha256 (roofline)", "roofline"), ("cp + coreutils sha256sum", "roofline_coreutils"),
                           (f"requant convert --local ({results['cores']} cores)", "requant"),
                           ("requant convert --local (1 core)", "requant_1_core")):
            m = r[key]
            mbs = r["bytes_in"] / 1e6 / m["seconds"]
            share = (f"{m['of_roofline']:.2f} | {m['of_roofline_coreutils']:.2f}" if "of_roofline" in m else " | ")
            lines.append(f"| {where} | {label} | {m['seconds']:.1f} | {mbs:.0f} | {m['cpu_percent']:.0f} | "
                         f"{m['peak_rss_mb']:.0f} | {share} |")
    lines.append("")
    for where in ("tmpfs", "disk"):
        r = results.get(where)
        if r:
            lines.append(f"- {where}: all cores / 1 core {r['all_cores_speedup']:.2f}x; output {r['bytes_out'] / 1e9:.2f} GB")
    s3 = results.get("s3")
    if s3:
        roof = s3["roofline"]
        bound = s3.get("shared_cpu_bound_seconds")
        lines += ["", "| S3 (SeaweedFS, loopback) | wall s | MB/s in | of GET+PUT roofline (jobs phase) | "
                      "of shared-CPU bound | machine busy | CPU s: S3 server | CPU s: the rest |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| concurrent GET + PUT of the same bytes (transfer manager) | {roof['seconds']:.1f} | "
                  f"{roof['mb_per_s_in']:.0f} | | | {_cpu_cells(roof)} |"]
        for n, run in s3["flow"].items():
            t = run["timings"]
            share = f"{run['of_shared_cpu_bound']:.2f}" if "of_shared_cpu_bound" in run else ""
            lines.append(f"| requantize flow, {n} Ray worker(s): total (jobs) | {t['total']:.1f} ({t['jobs']:.1f}) | "
                         f"{run['mb_per_s_in']:.0f} ({run['jobs_mb_per_s_in']:.0f}) | {run['of_roofline']:.2f} | "
                         f"{share} | {_cpu_cells(run)} |")
        lines.append("")
        if bound:
            lines.append(f"- shared-CPU bound: the larger of the roofline and (the S3 server's CPU time in the roofline + "
                         f"`convert --local`'s on one core) / {results['cores']} cores: {bound:.1f} s")
        for n, run in s3["flow"].items():
            if "cpu" in run:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in run["cpu"]["cpu_seconds"].items())
                lines.append(f"- CPU seconds, flow with {n} worker(s): {parts}")
        if s3.get("scaling"):
            lines.append(f"- 1 -> {list(s3['flow'])[-1]} Ray workers: {s3['scaling']:.2f}x")
    lines += ["", f"Machine: {results['cores']} cores; {results['note']}"]
    return "\n".join(lines) + "\n"


def _cpu_cells(run: dict[str, Any]) -> str:
    """Machine busy share, the S3 server's CPU seconds and everyone else's, as table cells."""
    cpu = run.get("cpu")
    if not cpu:
        return " | | "
    server = cpu["cpu_seconds"].get("s3 server", 0.0)
    return f"{100 * cpu['machine_busy']:.0f}% | {server:.1f} | {cpu['cpu_seconds_total'] - server:.1f}"


def run_layer_bench(args) -> dict[str, Any]:
    from requant.synth import synthesize

    experts = args.experts
    results: dict[str, Any] = {"recipe": args.recipe, "cores": available_cores(),
                               "note": "each figure from one run; ratios are side by side in that run"}
    places = {"tmpfs": Path(args.tmpfs) if args.tmpfs else None, "disk": Path(args.disk) if args.disk else None}
    for where, base in places.items():
        if base is None:
            continue
        work = Path(tempfile.mkdtemp(prefix="requant-bench-layer-", dir=base))
        try:
            upstream = synthesize(work / "upstream", "k26-layer", seed=0, progress=True, experts=experts)
            results["fixture"] = {"experts": experts, "bytes": _bytes(upstream)}
            print(f"{where}: measuring in {work}", file=sys.stderr)
            results[where] = local_bench(upstream, work, args.recipe)
            _save(results, args.out)
            if where == "disk" and args.s3:
                one_core = results[where]["requant_1_core"]
                results["s3"] = s3_bench(upstream, work, [int(n) for n in args.workers.split(",")], args.recipe,
                                         convert_cpu_seconds=one_core["seconds"] * one_core["cpu_percent"] / 100)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(_save(results, args.out))
    return results


def _save(results: dict[str, Any], out: str | None) -> str:
    """Write what was measured so far (a long run that fails late keeps its earlier figures)."""
    text = render(results)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "layer.json").write_text(json.dumps(results, indent=2) + "\n")
        (Path(out) / "layer.md").write_text(text)
    return text
