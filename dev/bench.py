"""The benchmarks that run the requantize flow (the orchestration side; the library's own are ``requant bench``).

``python -m dev.bench flow`` (``make bench-flow``): the requantize flow on k26-topology with 1 and 2 local Ray
workers, per-stage times, orchestration overhead, and the roofline of copying the same bytes through the same S3
server.

``python -m dev.bench layer`` (``make bench-layer``): ``requant bench layer``'s tmpfs and disk measurements of one
K2.6 layer at real widths, then the same layer through S3: the roofline is a concurrent GET of the input shards
and PUT of the same number of bytes through boto3's transfer manager; then the requantize flow with 1 and 2 local
Ray workers. On one machine the S3 server shares the cores with the conversion, so the S3 runs also record where
the CPU time went (:mod:`requant.bench.cpu`) and the machine's busy share. From them, a shared-CPU bound for the
flow: the S3 server's CPU time for moving the bytes (the roofline's) plus the conversion's own (``convert --local``
on one core), over the cores. Last, the same layer synthesized in each other upstream format (``--sources``,
default FP8 block-scaled) converted on tmpfs, side by side with the INT4 path.

Each configuration runs in a fresh process (a fresh local Ray with that many CPUs) against one
SeaweedFS server; every run writes to a new output prefix, so nothing is resumed. Each run also records where
its CPU time went (Ray's workers, the flow's driver, Ray's services, Prefect's server, the S3 server) and how
busy the machine was: on a machine whose cores the services share with the workers, that bounds the scaling.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from requant.bench.cpu import CpuSampler, ray_part
from requant.bench.layer import LAYER_RECIPE, _bytes, _shards, run_layer_bench
from requant.bench.provenance import CONVERSION, FLOW, run_info, write_results
from requant.formats.source import SourceFormat
from requant.io.s3 import S3Storage
from requant.io.transfer import upload_dir
from requant.job import available_cores
from requant.testing import seaweed
from requant.testing.synth import synthesize


def copy_roofline(upstream: str, scratch: str) -> dict:
    """GET every upstream shard and PUT it again through the same server, from one process."""
    src, dst = S3Storage(upstream), S3Storage(scratch)
    dst.ensure_bucket()
    files = [f for f in src.list_files() if f.endswith(".safetensors")]
    start = time.perf_counter()
    moved = 0
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            local = Path(tmp) / f
            src.copy_file_to(f, local)
            dst.put_file(f, local)
            moved += local.stat().st_size
            local.unlink()
    seconds = time.perf_counter() - start
    return {"bytes": moved, "seconds": seconds, "mb_per_s": moved / 1e6 / seconds}


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


# The code the flow benchmark measures (make bench-flow: results/flow.json).
MEASURES = (*CONVERSION, *FLOW, "dev/bench.py")
_RUN_FLOW = """
import dataclasses, json, sys
from requant.flows.requantize import requantize
from requant.flows.runtime import start_ephemeral_server
start_ephemeral_server()
conversion = requantize(upstream=sys.argv[1], output=sys.argv[2], recipe=sys.argv[3], progress=False,
                        evaluation={"enabled": False}).conversion
print("RESULT " + json.dumps(dataclasses.asdict(dataclasses.replace(conversion, manifest=None))))
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
    from requant.io.transfer import upload_dir
    from requant.testing import seaweed

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("flow", help="the requantize flow on a synthetic profile with 1 and 2 local Ray workers")
    f.add_argument("--profile", default="k26-topology")
    f.add_argument("--workers", default="1,2")
    f.add_argument("--out", default="results", help="writes flow.json and flow.md here")
    la = sub.add_parser("layer", help="one K2.6 layer at real widths on tmpfs, on disk and through S3 + the flow")
    la.add_argument("--experts", type=int, default=96, help="routed experts (384 = a whole K2.6 layer, 10.8 GB)")
    la.add_argument("--recipe", default=LAYER_RECIPE)
    la.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs directory ('' to skip)")
    la.add_argument("--disk", default=".", help="a directory on disk ('' to skip)")
    la.add_argument("--no-s3", dest="s3", action="store_false", help="skip the S3 flow runs")
    la.add_argument("--workers", default="1,2", help="Ray worker counts for the flow runs")
    la.add_argument("--out", default="results", help="writes layer.json and layer.md here")
    la.add_argument("--sources", default=SourceFormat.FP8_BLOCK.value,
                    help="other upstream formats of the same layer, compared with INT4 on tmpfs (comma-separated; '' to skip)")
    args = parser.parse_args(argv)
    if args.command == "layer":
        workers = [int(n) for n in args.workers.split(",")]
        part = (lambda up, work, cpu_s: s3_bench(up, work, workers, args.recipe, cpu_s)) if args.s3 else None
        run_layer_bench(args.experts, recipe=args.recipe, tmpfs=args.tmpfs, disk=args.disk, out=args.out, s3_part=part,
                        sources=tuple(SourceFormat(s) for s in args.sources.split(",") if s))
        return 0
    return flow_bench(args.profile, [int(w) for w in args.workers.split(",")], args.out)


def flow_bench(profile: str, workers: list[int], out: str | None) -> int:
    """The requantize flow on ``profile`` with each of ``workers`` local Ray workers; flow.json and flow.md into
    ``out``."""
    with tempfile.TemporaryDirectory(prefix="requant-bench-flow-") as tmp:
        server = seaweed.start(Path(tmp) / "seaweed")
        os.environ.update(server.env())
        try:
            local = synthesize(Path(tmp) / "up", profile, seed=0, progress=False)
            upstream = f"s3://bench/upstream/{profile}"
            upload_dir(local, upstream)
            results = {"run": run_info(measures=MEASURES), "profile": profile,
                       "roofline": copy_roofline(upstream, "s3://bench/copy"), "runs": {}}
            for n in workers:
                run, wall, cpu = measured_flow_run(upstream, f"s3://bench/out-{n}", "kimi-k2.6-mxfp4", n,
                                                   dict(os.environ), server.pid)
                run["process_wall"] = wall
                run["cpu"] = cpu
                results["runs"][n] = run
        finally:
            seaweed.stop(server)
    text = render(results)
    write_results(out, "flow", results, text)
    print(text)
    return 0


def render(results: dict) -> str:
    roof = results["roofline"]
    lines = [f"## Flow: {results['profile']} through SeaweedFS + local Ray", "",
             "| Ray workers | wall s (process) | flow s | plan s | layer jobs s | publish s | verify s | "
             "transcode s (sum) | upload s (sum) | overhead share | MB moved | MB/s moved |",
             "|---:|" + "---:|" * 11]
    base = None
    for workers, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        t = run["timings"]
        moved = (run["bytes_in"] + run["bytes_out"]) / 1e6
        busy = (t["transcode_sum"] + t["upload_sum"]) / int(workers)
        overhead = (t["total"] - t["plan"] - t["publish"] - t["verify"] - busy) / t["total"]
        lines.append(f"| {workers} | {run['process_wall']:.1f} | {t['total']:.1f} | {t['plan']:.1f} | {t['jobs']:.1f} | "
                     f"{t['publish']:.1f} | {t['verify']:.1f} | {t['transcode_sum']:.1f} | {t['upload_sum']:.1f} | "
                     f"{overhead:.0%} | {moved:.0f} | {moved / t['total']:.1f} |")
        base = base or t["total"]
    runs = sorted(results["runs"].items(), key=lambda kv: int(kv[0]))
    if len(runs) > 1:
        lines += ["", f"- scaling {runs[0][0]} -> {runs[-1][0]} workers: {runs[0][1]['timings']['total'] / runs[-1][1]['timings']['total']:.2f}x"]
    lines += [f"- roofline: copying the upstream shards through the same S3 server (GET + PUT, one process): "
              f"{roof['mb_per_s']:.0f} MB/s ({roof['bytes'] / 1e6:.0f} MB in {roof['seconds']:.1f} s)"]
    for workers, run in runs:
        cpu = run.get("cpu")
        if cpu:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in cpu["cpu_seconds"].items())
            lines.append(f"- CPU seconds with {workers} worker(s), whole process: {parts}; machine busy "
                         f"{cpu['machine_busy']:.0%} of {cpu['cores']} cores over {cpu['wall_seconds']:.1f} s")
    if len(runs) > 1 and all("cpu" in run for _, run in runs):
        # Amdahl on this machine: the workers' CPU time may spread over the cores; everything else shares them
        first = runs[0][1]["cpu"]
        total, cores = first["cpu_seconds_total"], first["cores"]
        lines.append(f"- with every process of the 1-worker run spread over {cores} cores at once, the run could not "
                     f"take less than {total / cores:.1f} s of CPU-bound time "
                     f"(scaling at most {runs[0][1]['process_wall'] / (total / cores):.2f}x, process wall)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
