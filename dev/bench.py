"""``make bench-flow``: the requantize flow on k26-topology with 1 and 2 local Ray workers, per-stage
times, orchestration overhead, and the roofline of copying the same bytes through the same S3 server.

Each configuration runs in a fresh process (a fresh local Ray with that many CPUs) against one
SeaweedFS server; every run writes to a new output prefix, so nothing is resumed. Each run also records where
its CPU time went (Ray's workers, the flow's driver, Ray's services, Prefect's server, the S3 server) and how
busy the machine was: on a machine whose cores the services share with the workers, that bounds the scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from requant import seaweed
from requant.bench.layer import measured_flow_run
from requant.io.s3 import S3Storage
from requant.io.transfer import upload_dir
from requant.synth import synthesize


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="k26-topology")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="requant-bench-flow-") as tmp:
        server = seaweed.start(Path(tmp) / "seaweed")
        os.environ.update(server.env())
        try:
            local = synthesize(Path(tmp) / "up", args.profile, seed=0, progress=False)
            upstream = f"s3://bench/upstream/{args.profile}"
            upload_dir(local, upstream)
            results = {"profile": args.profile, "roofline": copy_roofline(upstream, "s3://bench/copy"), "runs": {}}
            for workers in [int(w) for w in args.workers.split(",")]:
                run, wall, cpu = measured_flow_run(upstream, f"s3://bench/out-{workers}", "kimi-k2.6-mxfp4", workers,
                                                   dict(os.environ), server.pid)
                run["process_wall"] = wall
                run["cpu"] = cpu
                results["runs"][workers] = run
        finally:
            seaweed.stop(server)
    text = render(results)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "flow.json").write_text(json.dumps(results, indent=2) + "\n")
    (Path(args.out) / "flow.md").write_text(text)
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
