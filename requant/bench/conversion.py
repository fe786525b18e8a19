"""``requant bench conversion`` (``make bench``): kernel and whole-checkpoint throughput, measured side by side in one run.

Kernel: one Kimi-K2.6 expert matrix (2048 x 7168), counted as MB/s of BF16-equivalent input, for the
fused INT4 -> MXFP4 kernel, the plain-torch reference path, Quark 0.11's per-tensor MXFP4 path on the
same weights (with a bit-identity check), and a plain BF16 copy of the tensor (the memory roofline),
each on 1 thread and on all cores. Checkpoint: ``requant convert --local`` against Quark's
file-to-file export of the same k26-topology input, wall time and peak RSS of each process.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch

from requant.bench.provenance import CONVERSION, describe, run_info, write_results
from requant.formats.fused import int4_to_mxfp4
from requant.formats.int4 import dequantize_int4
from requant.formats.mxfp4 import quantize_mxfp4

# The code these figures measure (results/bench.json records it; the docs mark the figures once it changes).
MEASURES = (*CONVERSION, "requant/bench/conversion.py", "requant/testing/quark_reference.py")
EXPERT_SHAPE = (2048, 7168)  # Kimi-K2.6 gate/up projection: moe_intermediate_size x hidden_size


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (tables, allocator)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return median(samples)


def _quark_mxfp4() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Quark's per-tensor path as its file-to-file exporter runs it, or None without amd-quark."""
    from requant.formats.table import WEIGHT_FORMATS
    from requant.testing.quark_reference import quark_available, quark_quantize_weight

    scheme = WEIGHT_FORMATS["mxfp4"].quark_scheme
    return (lambda weight: quark_quantize_weight(weight, scheme)) if quark_available() else None


def kernel_bench(repeats: int = 5) -> dict[str, Any]:
    from requant.testing.synth import _Weights

    rows, cols = EXPERT_SHAPE
    expert = _Weights(seed=0).int4_experts(1, rows, cols)[0]
    packed, scale = expert["weight_packed"], expert["weight_scale"]
    weight = dequantize_int4(packed, scale, cols)
    mb = weight.numel() * 2 / 1e6
    quark = _quark_mxfp4()
    copy_dst = torch.empty_like(weight)
    fused_out = int4_to_mxfp4(packed, scale, cols)
    identical = {"reference": all(torch.equal(a, b) for a, b in zip(fused_out, quantize_mxfp4(weight)))}
    if quark:
        identical["quark"] = all(torch.equal(a, b) for a, b in zip(fused_out, quark(weight)))
    cores = os.cpu_count() or 1
    exact_out = int4_to_mxfp4(packed, scale, cols, exact=True)
    identical["reference (0.13, exact decode)"] = all(
        torch.equal(a, b) for a, b in zip(exact_out, quantize_mxfp4(dequantize_int4(packed, scale, cols, dtype=torch.float32))))
    cases = {
        "fused INT4->MXFP4": lambda: int4_to_mxfp4(packed, scale, cols),
        "fused INT4->MXFP4, Quark 0.13 target (exact decode)": lambda: int4_to_mxfp4(packed, scale, cols, exact=True),
        f"fused INT4->MXFP4, {cores} row threads": lambda: int4_to_mxfp4(packed, scale, cols, threads=cores),
        "reference INT4->BF16->MXFP4": lambda: quantize_mxfp4(dequantize_int4(packed, scale, cols)),
        "BF16 copy, fresh output (clone)": lambda: weight.clone(),
        "BF16 copy into a preallocated tensor": lambda: copy_dst.copy_(weight),
    }
    if quark:
        cases["Quark 0.11 MXFP4 (BF16 in)"] = lambda: quark(weight)
    threads_all = torch.get_num_threads()
    results: dict[str, dict[str, float]] = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        for name, fn in cases.items():
            if "row threads" in name and threads > 1:
                continue  # row threads use one torch thread each
            reps = 1 if name.startswith("Quark") else repeats
            results.setdefault(name, {})[f"{threads}t"] = mb / _time(fn, reps)
    torch.set_num_threads(threads_all)
    out: dict[str, Any] = {"shape": list(EXPERT_SHAPE), "bf16_mb": mb, "mb_per_s": results, "bit_identical": identical}
    fused, copy = results["fused INT4->MXFP4"], results["BF16 copy, fresh output (clone)"]
    out["fused_vs_copy_1t"] = fused["1t"] / copy["1t"]
    out["fused_vs_copy_into_1t"] = fused["1t"] / results["BF16 copy into a preallocated tensor"]["1t"]
    parallel = results[f"fused INT4->MXFP4, {cores} row threads"]["1t"]
    out["fused_all_cores_mb_per_s"] = max(parallel, fused.get(f"{cores}t", 0.0))
    if quark:
        q = results["Quark 0.11 MXFP4 (BF16 in)"]
        out["fused_vs_quark"] = {k: fused[k] / q[k] for k in fused}
    out["quark_targets"] = quark_targets(packed, scale, cols)
    return out


def quark_targets(packed: torch.Tensor, scale: torch.Tensor, cols: int) -> dict[str, Any]:
    """For each format, the error of the Quark 0.11 and 0.13 targets against the exact INT4 weights (SNR over the
    whole matrix) and how many elements and scales the two targets write differently."""
    from requant.formats.table import INT4_DECODE_DTYPE, weight_formats

    exact = dequantize_int4(packed, scale, cols, dtype=torch.float32).double()
    out: dict[str, Any] = {}
    for fmt in ("mxfp4", "fp8_per_channel"):
        encoded, row = {}, {}
        for version in ("0.11", "0.13"):
            f = weight_formats(version)[fmt]
            if f.from_int4 is not None:
                encoded[version] = f.from_int4(packed, scale, cols)
            else:
                encoded[version] = f.encode(dequantize_int4(packed, scale, cols, dtype=INT4_DECODE_DTYPE[f"quark-{version}"]))
            error = exact - f.decode(*encoded[version]).double()
            row[f"snr_db_{version}"] = 10 * math.log10(exact.pow(2).sum().item() / error.pow(2).sum().item())
        old, new = (weight_formats(v)[fmt].decode(*encoded[v]) for v in ("0.11", "0.13"))
        row["elements_differing"] = (old != new).double().mean().item()
        scales = [encoded[v][1].to(torch.float32) for v in ("0.11", "0.13")]
        row["scales_differing"] = (scales[0] != scales[1]).double().mean().item()
        out[fmt] = row
    return out


# A small launcher forks the measured command, so the child's peak RSS (getrusage of children) is its
# own and not the pages a fork would inherit from this (large) benchmark process.
_LAUNCHER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - start
if proc.returncode:
    sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
    sys.exit(proc.returncode)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "cpu_percent": 100 * (usage.ru_utime + usage.ru_stime) / wall}))
"""


def _run_measured(cmd: list[str]) -> dict[str, float]:
    """Run a command; its wall time, CPU time over wall time (%) and its own peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


BENCH_RECIPE = "kimi-k2.6-mxfp4"  # the seed card's recipe; Quark runs its equivalent (requant.testing.quark_reference)
IMPORT_BASELINE = "import torch, requant.job, requant.planning"


def checkpoint_bench(upstream: Path | None, work: Path, with_quark: bool, layers: int | None = None) -> dict[str, Any]:
    """requant vs Quark file-to-file on k26-topology (``layers`` keeps only the first N decoder layers:
    Quark needs ~20 ms per tensor here, over an hour for all 61 layers on 2 cores)."""
    import dataclasses

    from requant.io.storage import LocalDir
    from requant.planning import build_plan
    from requant.recipe import load_checks, load_recipe
    from requant.testing.quark_reference import file2file_command
    from requant.testing.synth import PROFILES, synthesize

    if upstream is None:
        profile = PROFILES["k26-topology"]
        if layers:
            profile = dataclasses.replace(profile, layers=layers)
        upstream = synthesize(work / "k26-topology", profile, seed=0, progress=False)
    plan = build_plan(LocalDir(upstream), load_recipe(BENCH_RECIPE))
    tensors = sum(len(t.inputs) for j in plan.jobs for t in j.tasks)
    out: dict[str, Any] = {"upstream": str(upstream), "layers": plan.config.num_layers, "tensors": tensors,
                           "jobs": len(plan.jobs), "model_mb": plan.bytes_in / 1e6,
                           "largest_job_mb": max(j.bytes_in for j in plan.jobs) / 1e6}
    out["python_torch_baseline"] = _run_measured([sys.executable, "-c", IMPORT_BASELINE])
    requant_bin = [sys.executable, "-m", "requant.cli"]
    out["requant"] = _run_measured([*requant_bin, "convert", str(upstream), str(work / "requant-out"),
                                    "--recipe", BENCH_RECIPE, "--local"])
    if with_quark:
        job = load_checks(BENCH_RECIPE).quark.job(str(work / "quark-out"))
        out["quark"] = _run_measured(file2file_command(str(upstream), [job]))
        out["speedup_vs_quark"] = out["quark"]["seconds"] / out["requant"]["seconds"]
        out["bit_identical_to_quark"] = _same_tensors(work / "requant-out", work / "quark-out")
    return out


def _same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def load(d: Path) -> dict[str, bytes]:
        out = {}
        for shard in sorted(d.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                out.update({k: f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes() for k in f.keys()})
        return out

    return load(a) == load(b)


def render_targets(results: dict[str, Any]) -> str:
    """The Quark 0.11 and 0.13 targets against the exact INT4 weights of the benchmark's expert matrix."""
    k = results["kernel"]
    lines = [f"| format (one {k['shape'][0]}x{k['shape'][1]} INT4 expert) | SNR vs exact INT4, Quark 0.11 target dB | "
             "SNR, Quark 0.13 target dB | elements that differ | scales that differ |", "|---|---:|---:|---:|---:|"]
    for fmt, t in k["quark_targets"].items():
        lines.append(f"| {fmt} | {t['snr_db_0.11']:.3f} | {t['snr_db_0.13']:.3f} | {t['elements_differing']:.2%} | "
                     f"{t['scales_differing']:.2%} |")
    return "\n".join(lines) + "\n"


def render(results: dict[str, Any]) -> str:
    k = results["kernel"]
    threads = list(next(iter(k["mb_per_s"].values())))
    lines = [f"## Kernel: one expert matrix {k['shape'][0]}x{k['shape'][1]} ({k['bf16_mb']:.1f} MB of BF16)", "",
             "| path | " + " | ".join(f"MB/s ({t})" for t in threads) + " |", "|---|" + "---:|" * len(threads)]
    for name, row in k["mb_per_s"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[t]:.0f}" if t in row else "" for t in threads) + " |")
    lines += ["", f"- fused / BF16 copy (clone), 1 thread: {k['fused_vs_copy_1t']:.0%}; "
                  f"/ copy into a preallocated tensor: {k['fused_vs_copy_into_1t']:.0%}",
              f"- fused on all cores: {k['fused_all_cores_mb_per_s']:.0f} MB/s"]
    if "fused_vs_quark" in k:
        lines.append("- fused / Quark: " + ", ".join(f"{v:.1f}x ({t})" for t, v in k["fused_vs_quark"].items()))
    lines.append(f"- bit-identical: {k['bit_identical']}")
    if "quark_targets" in k:
        lines += ["", render_targets(results)]
    c = results.get("checkpoint")
    if c:
        base = c["python_torch_baseline"]["peak_rss_mb"]
        lines += ["", f"## Checkpoint: k26-topology, {c['layers']} layers, {c['tensors']} tensors, {c['jobs']} jobs, "
                      f"{c['model_mb']:.0f} MB upstream, largest job {c['largest_job_mb']:.1f} MB", "",
                  "| converter | wall s | peak RSS MB | RSS over python+torch baseline MB |", "|---|---:|---:|---:|"]
        for name in ("requant", "quark"):
            if name in c:
                r = c[name]
                lines.append(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:.0f} |")
        if "speedup_vs_quark" in c:
            lines += ["", f"- requant is {c['speedup_vs_quark']:.1f}x faster than Quark's file-to-file; "
                          f"outputs bit-identical: {c['bit_identical_to_quark']}"]
    lines += ["", f"Measured {describe(results['run'])}." if "run" in results else
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"]
    return "\n".join(lines) + "\n"


def run_bench(out: str | None = None, repeats: int = 5, upstream: str | None = None, layers: int | None = 9,
              skip_checkpoint: bool = False) -> dict[str, Any]:
    """The kernels (``repeats`` timings each), then unless ``skip_checkpoint`` a whole checkpoint (``upstream``, or
    k26-topology with ``layers`` decoder layers synthesized); bench.json and bench.md into ``out``."""
    results: dict[str, Any] = {"run": run_info(measures=MEASURES), "kernel": kernel_bench(repeats)}
    if not skip_checkpoint:
        with tempfile.TemporaryDirectory(prefix="requant-bench-") as tmp:
            results["checkpoint"] = checkpoint_bench(Path(upstream) if upstream else None, Path(tmp),
                                                     with_quark=_quark_mxfp4() is not None, layers=layers)
    write_results(out, "bench", results, render(results))
    return results
