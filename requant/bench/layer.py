"""``requant bench layer`` / ``make bench-layer``: Kimi-K2.6's real widths, each path against its own roofline
measured in the same run.

The fixture is ``synth --profile k26-layer`` (layer 0 dense with intermediate 18432, one MoE layer of 2048x7168
INT4 experts, real MLA). Per location (a disk directory, tmpfs):

- the roofline: what any conversion of these shards must do at least, done with nothing else: read every input
  byte and hash it, write as many bytes and hash them, fsync the copies (requant fsyncs each shard too), with the
  fastest SHA-256 here (OpenSSL through hashlib, SHA-NI where the CPU has it, the one requant uses), the shards
  spread over one thread per core, largest first. Output bytes are taken equal to the input's (requant writes
  ~0.96 of them), so the roofline is, if anything, slower than the true bound;
- for reference: the same copy and hash on one thread, input only (the roofline of earlier results), and coreutils
  ``cp`` + ``sha256sum`` (which uses no SHA extensions);
- ``requant convert --local`` with default settings (every core) and pinned to one core.

Every measured command runs in its own process: wall time, CPU time and its own peak RSS. The same layer through
S3 and the requantize flow on Ray (``make bench-layer``) is measured by the orchestration side, ``dev/bench.py``,
which passes its measurement in as ``s3_part``; this module only renders it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from requant.bench.conversion import _run_measured
from requant.bench.provenance import CONVERSION, FLOW, describe, run_info, write_results
from requant.formats.source import SourceFormat
from requant.job import available_cores

# The code these figures measure; dev/bench.py adds the S3 and flow runs (make bench-layer).
MEASURES = (*CONVERSION, *FLOW, "requant/bench/layer.py", "requant/bench/conversion.py", "dev/bench.py")
REPEATS = 3  # rounds of the roofline and the conversions; each figure is the median
LAYER_RECIPE = "amd-kimi-mxfp4"  # AMD's published recipe: every routed expert to MXFP4, attention and dense MLP kept

# the roofline: each shard read once, its bytes hashed as the input's and, written out, as an output's digest
_ROOFLINE = """
import hashlib, json, os, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
src, dst, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dst.mkdir(parents=True, exist_ok=True)
def copy_and_hash(f):
    read_digest, written_digest = hashlib.sha256(), hashlib.sha256()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(f, "rb", buffering=0) as fin, open(dst / f.name, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            read_digest.update(view[:n])
            fout.write(view[:n])
            written_digest.update(view[:n])
        os.fsync(fout.fileno())
    return read_digest.hexdigest(), written_digest.hexdigest()
shards = sorted(src.glob("*.safetensors"), key=lambda p: -p.stat().st_size)
with ThreadPoolExecutor(threads) as pool:
    print(json.dumps(dict(zip((p.name for p in shards), pool.map(copy_and_hash, shards)))))
"""
# one conversion in this process, its jobs one at a time on ``threads`` transcode threads: its stage seconds
_STAGE_PROFILE = """
import json, sys, time
import requant
src, dst, recipe, threads, out = sys.argv[1:6]
start = time.perf_counter()
summary = requant.convert(src, dst, recipe, threads=int(threads), jobs=1, overwrite=True, progress=False)
wall = time.perf_counter() - start
largest = max(summary.manifest["jobs"], key=lambda job: job["bytes_in"])
with open(out, "w") as f:
    json.dump({"wall": wall, "largest_job": {k: largest[k] for k in ("job", "bytes_in", "seconds")}, **summary.timings}, f)
"""
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


def local_bench(upstream: Path, work: Path, recipe: str = LAYER_RECIPE, repeats: int = REPEATS) -> dict[str, Any]:
    """Roofline and conversions of ``upstream`` with outputs under ``work`` (same file system as measured): the
    roofline and both conversions ``repeats`` times, interleaved so that each round measures them side by side, each
    figure the run of median time (every run's seconds beside it); the references and the stage profiles once."""
    size = _bytes(upstream)
    out: dict[str, Any] = {"bytes_in": size, "where": str(work), "repeats": repeats}
    copy = work / "copy"
    convert = [sys.executable, "-m", "requant.cli", "convert", str(upstream), str(work / "out"), "--recipe", recipe,
               "--local", "--overwrite"]
    measures = {
        "roofline": [sys.executable, "-c", _ROOFLINE, str(upstream), str(copy), str(available_cores())],
        "requant": convert,
        "requant_1_core": ["taskset", "-c", str(min(os.sched_getaffinity(0))), *convert],
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, command in measures.items():
            runs[name].append(_run_measured(command))
            if name == "requant":
                out["bytes_out"] = _bytes(work / "out")
            shutil.rmtree(copy if name == "roofline" else work / "out")
    for name, measured in runs.items():
        median = sorted(measured, key=lambda r: r["seconds"])[len(measured) // 2]
        out[name] = {**median, "runs_s": [r["seconds"] for r in measured]}
    out["roofline_one_thread"] = _run_measured([sys.executable, "-c", _COPY_SHA, str(upstream), str(copy)])
    shutil.rmtree(copy)
    files = " ".join(f"'{f}'" for f in _shards(upstream))
    out["roofline_coreutils"] = _run_measured(["bash", "-c", f"mkdir -p '{copy}' && cp {files} '{copy}/' && "
                                                             f"sync '{copy}'/*.safetensors && sha256sum '{copy}'/*.safetensors > /dev/null"])
    shutil.rmtree(copy)
    for name in ("requant", "requant_1_core"):
        r = out[name]
        r["mb_per_s_in"] = size / 1e6 / r["seconds"]
        r["of_roofline"] = out["roofline"]["seconds"] / r["seconds"]
    out["all_cores_speedup"] = out["requant_1_core"]["seconds"] / out["requant"]["seconds"]
    out["stages"] = {}
    for threads in sorted({1, available_cores()}):
        profile = work / f"stages-{threads}.json"
        _run_measured([sys.executable, "-c", _STAGE_PROFILE, str(upstream), str(work / "out"), recipe, str(threads),
                       str(profile)])
        out["stages"][str(threads)] = json.loads(profile.read_text())
        shutil.rmtree(work / "out")
    return out


# the stage rows of the profile table, with what each means (requant.stages)
STAGE_ROWS = (("hash_inputs", "hash the input shards (their own thread, beside the jobs)"),
              ("stage_read", "read input spans (read-ahead threads)"),
              ("stage_transcode", "transcode: decode, encode, checks (transcode threads)"),
              ("stage_snr", "  of which: sampled SNR of each quantized tensor"),
              ("stage_write", "write output bytes, fsync (writer thread)"),
              ("stage_hash_out", "SHA-256 of the output (its own thread)"),
              ("stage_wait_read", "coordinator waiting for reads"),
              ("stage_wait_transcode", "coordinator waiting for transcodes"),
              ("stage_wait_write", "coordinator waiting for the writer"))


def work_bound(r: dict[str, Any], cores: int | None) -> dict[str, float] | None:
    """What no conversion of the layer can beat on this machine: the roofline's CPU time (every byte read, hashed,
    written, hashed) plus the transcode's time on one thread (from the stage profile), spread perfectly over every
    core, with no process start, planning or waiting. None without a 1-thread stage profile."""
    try:
        roofline = r["roofline"]
        transcode = r["stages"]["1"]["stage_transcode"]
    except (KeyError, TypeError):
        return None
    if not cores:
        return None
    cpu = roofline["seconds"] * roofline["cpu_percent"] / 100
    seconds = max(roofline["seconds"], (cpu + transcode) / cores)
    return {"seconds": seconds, "of_roofline": roofline["seconds"] / seconds, "roofline_cpu_s": cpu,
            "transcode_s": transcode}


def _stages_table(where: str, r: dict[str, Any]) -> list[str]:
    """Seconds per stage summed over threads (and threads kept busy: seconds / wall), per thread count."""
    profiles = r.get("stages") or {}
    if not profiles:
        return []
    counts = sorted(profiles, key=int)
    head = " | ".join(f"{n} thread{'s' if n != '1' else ''}: s (busy)" for n in counts)
    lines = ["", f"Where a conversion's time goes ({where}; `convert` with its jobs one at a time, seconds summed over "
                 "the threads of each stage, and in brackets that over the wall time: the threads it kept busy):", "",
             f"| stage | {head} |", "|---|" + "---:|" * len(counts)]
    lines.append("| wall | " + " | ".join(f"{profiles[n]['wall']:.1f}" for n in counts) + " |")
    if all("largest_job" in profiles[n] for n in counts):  # the MoE layer's job alone, against the roofline's rate
        roofline_rate = r["bytes_in"] / r["roofline"]["seconds"]
        cells = []
        for n in counts:
            job = profiles[n]["largest_job"]
            rate = job["bytes_in"] / job["seconds"]
            cells.append(f"{job['seconds']:.1f} ({rate / 1e6:.0f} MB/s in, {rate / roofline_rate:.2f} of the roofline's)")
        lines.append(f"| its largest job ({profiles[counts[0]]['largest_job']['job']}) alone | " + " | ".join(cells) + " |")
    for key, label in STAGE_ROWS:
        cells = [f"{profiles[n].get(key, 0.0):.1f} ({profiles[n].get(key, 0.0) / profiles[n]['wall']:.2f})"
                 for n in counts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def render(results: dict[str, Any]) -> str:
    f = results["fixture"]
    lines = [f"## One Kimi-K2.6 layer at real widths: {f['experts']} routed experts, {f['bytes'] / 1e9:.2f} GB in, "
             f"recipe {results['recipe']}", "",
             "| where | path | wall s | MB/s in | CPU % | peak RSS MB | of roofline |", "|---|---|---:|---:|---:|---:|---:|"]
    for where in ("tmpfs", "disk"):
        r = results.get(where)
        if not r:
            continue
        for label, key in ((f"roofline: read + SHA-256 in, write + SHA-256 out, {results['cores']} threads", "roofline"),
                           ("copy + SHA-256 of the input, one thread (reference)", "roofline_one_thread"),
                           ("cp + coreutils sha256sum (reference)", "roofline_coreutils"),
                           (f"requant convert --local ({results['cores']} cores)", "requant"),
                           ("requant convert --local (1 core)", "requant_1_core")):
            m = r[key]
            mbs = r["bytes_in"] / 1e6 / m["seconds"]
            share = f"{m['of_roofline']:.2f}" if "of_roofline" in m else ""
            lines.append(f"| {where} | {label} | {m['seconds']:.1f} | {mbs:.0f} | {m['cpu_percent']:.0f} | "
                         f"{m['peak_rss_mb']:.0f} | {share} |")
    lines.append("")
    for where in ("tmpfs", "disk"):
        r = results.get(where)
        if r:
            lines.append(f"- {where}: all cores / 1 core {r['all_cores_speedup']:.2f}x; output {r['bytes_out'] / 1e9:.2f} GB")
            if "runs_s" in r["requant"]:
                lines.append(f"- {where}: seconds of each run, in rounds side by side: " + "; ".join(
                    f"{label} {' / '.join(f'{x:.1f}' for x in r[key]['runs_s'])}" for label, key in (
                        ("roofline", "roofline"), (f"{results['cores']} cores", "requant"), ("1 core", "requant_1_core"))))
            if (bound := work_bound(r, results.get("cores"))) is not None:
                lines.append(f"- {where}: the most a conversion can reach here: {bound['of_roofline']:.2f} of the "
                             f"roofline ({bound['seconds']:.1f} s: the roofline's {bound['roofline_cpu_s']:.1f} CPU s "
                             f"and the transcode's {bound['transcode_s']:.1f} s on one thread, over "
                             f"{results['cores']} cores, nothing else; requant: {r['requant']['of_roofline']:.2f})")
    for where in ("tmpfs", "disk"):
        if results.get(where):
            lines += _stages_table(where, results[where])
    lines += _sources_table(results)
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
    lines += ["", f"Measured {describe(results['run'])}; {results['cores']} cores available; {results['note']}"
              if "run" in results else f"Machine: {results['cores']} cores; {results['note']}"]
    return "\n".join(lines) + "\n"


def _sources_table(results: dict[str, Any]) -> list[str]:
    """The same layer from each upstream format, against the INT4 path measured in the same place: the same
    weights, so a wall-time ratio is a throughput ratio in weights per second."""
    sources = results.get("sources") or {}
    if not sources:
        return []
    lines = ["", "| upstream format | where | GB in | path | wall s | MB/s in | MB/s in vs INT4 | weights/s vs INT4 | "
                 "peak RSS MB | peak RSS vs INT4 |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("int4", {**results[w], "place": w, "bytes": results[w]["bytes_in"]}) for w in ("tmpfs", "disk")
            if w in results][:1] + list(sources.items())
    int4 = rows[0][1] if rows[0][0] == "int4" else None
    for name, r in rows:
        for label, key in ((f"{results['cores']} cores", "requant"), ("1 core", "requant_1_core")):
            m = r[key]
            base = int4[key] if int4 and int4["place"] == r["place"] else None
            speed = f"{base['seconds'] / m['seconds']:.2f}x" if base else ""
            mbs = f"{r['bytes'] * base['seconds'] / (int4['bytes'] * m['seconds']):.2f}x" if base else ""
            rss = f"{m['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else ""
            lines.append(f"| {name} | {r['place']} | {r['bytes'] / 1e9:.2f} | {label} | {m['seconds']:.1f} | "
                         f"{r['bytes'] / 1e6 / m['seconds']:.0f} | {mbs} | {speed} | {m['peak_rss_mb']:.0f} | {rss} |")
    return lines


def _cpu_cells(run: dict[str, Any]) -> str:
    """Machine busy share, the S3 server's CPU seconds and everyone else's, as table cells."""
    cpu = run.get("cpu")
    if not cpu:
        return " | | "
    server = cpu["cpu_seconds"].get("s3 server", 0.0)
    return f"{100 * cpu['machine_busy']:.0f}% | {server:.1f} | {cpu['cpu_seconds_total'] - server:.1f}"


def run_layer_bench(experts: int, recipe: str = LAYER_RECIPE, tmpfs: str | None = "/dev/shm", disk: str | None = ".",
                    out: str | None = None,
                    s3_part: Callable[[Path, Path, float], dict[str, Any]] | None = None,
                    sources: tuple[str, ...] = (SourceFormat.FP8_BLOCK,)) -> dict[str, Any]:
    """k26-layer with ``experts`` routed experts converted with ``recipe`` under ``tmpfs`` and under ``disk`` (each
    skipped when empty); layer.json and layer.md into ``out``. With ``s3_part(upstream, work, convert_cpu_seconds)``
    (the orchestration side's S3 + flow measurement, given the conversion's own CPU seconds on one core) also
    through S3, on the disk's fixture. Then the same layer synthesized in each of ``sources`` (upstream formats
    other than INT4), converted on tmpfs (else on disk), side by side with the INT4 path's figures there."""
    from requant.testing.synth import synthesize

    results: dict[str, Any] = {"run": run_info(measures=MEASURES), "recipe": recipe, "cores": available_cores(),
                               "note": f"the roofline and the conversions: the median of {REPEATS} interleaved runs "
                                       f"(each run's seconds in runs_s); references and stage profiles: one run"}
    places = {"tmpfs": Path(tmpfs) if tmpfs else None, "disk": Path(disk) if disk else None}
    for where, base in places.items():
        if base is None:
            continue
        work = Path(tempfile.mkdtemp(prefix="requant-bench-layer-", dir=base))
        try:
            upstream = synthesize(work / "upstream", "k26-layer", seed=0, progress=True, experts=experts)
            results["fixture"] = {"experts": experts, "bytes": _bytes(upstream)}
            print(f"{where}: measuring in {work}", file=sys.stderr)
            results[where] = local_bench(upstream, work, recipe)
            _save(results, out)
            if where == "disk" and s3_part is not None:
                one_core = results[where]["requant_1_core"]
                results["s3"] = s3_part(upstream, work, one_core["seconds"] * one_core["cpu_percent"] / 100)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    base = places["tmpfs"] or places["disk"]
    for source in sources:  # the same layer published in another format, where the INT4 path was measured first
        work = Path(tempfile.mkdtemp(prefix="requant-bench-layer-", dir=base))
        try:
            upstream = synthesize(work / "upstream", "k26-layer", seed=0, progress=True, experts=experts, source=source)
            print(f"{source} upstream: measuring in {work}", file=sys.stderr)
            measured = local_bench(upstream, work, recipe)
            results.setdefault("sources", {})[str(source)] = {
                **measured, "place": "tmpfs" if base == places["tmpfs"] else "disk", "bytes": _bytes(upstream)}
            _save(results, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(_save(results, out))
    return results


def _save(results: dict[str, Any], out: str | None) -> str:
    """Write what was measured so far (a long run that fails late keeps its earlier figures)."""
    text = render(results)
    write_results(out, "layer", results, text)
    return text
