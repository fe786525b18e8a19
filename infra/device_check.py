"""The GPU path in one run (``make device-check``): whole layer jobs and the reference server on a device, each
compared with a different computation on the same machine.

1. A fixture on fast local storage: ``synth --profile k26-layer`` (K2.6's real widths, ``--experts`` routed
   experts) or, for CI's CPU lane, ``--profile tiny``.
2. For the MXFP4 and the FP8 recipe, two lanes of ``convert --local``, each in its own measured process: with
   ``--device DEVICE`` and with the CPU (every core); on the CPU (``--device cpu``, the CPU lane) with one
   transcode thread and with several, so the two are still different computations. Each lane: wall time, GB/s
   in, peak host RSS, peak device memory, and the share of the job's wall time spent in transcoding (host-to-device
   copy, kernels, copy back, summed over the transcode threads). The lanes' files, hashed on disk, must be
   byte-identical, ``verify`` must pass on each, and where amd-quark is installed every lane's tensors must equal
   Quark 0.11.2's own file-to-file export of the fixture (a third computation, in a process of its own).
3. The trained model (MXFP4) served by ``requant serve --device DEVICE`` and by a second, separately started
   ``requant serve`` on the CPU (on the CPU lane: the candidate on one torch thread, the reference on torch's
   default): the smoke test's checks with the CPU server as the reference (greedy continuations scored token by
   token: top-1 agreement, KL, exact match, on the task's prompts), and prefill/decode tokens/s of the model on
   each device.
4. One JSON (``--out``) that names the device, the threads and the process of every figure, and a short table.

On a bare GPU machine (Python 3.12, torch, safetensors, numpy, PyYAML, transformers): ``pip install --no-deps
--no-index .device-wheels/*.whl`` first (``make device-wheels`` downloads them here), then run this file from
the repository root with ``PYTHONPATH=.``. Exit status 1 when a comparison fails.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from requant.bench.provenance import CONVERSION, SERVING, source_info

RECIPES = ("amd-kimi-mxfp4", "fp8-reference")  # MXFP4 experts (AMD's recipe) and the per-channel FP8 baseline
SERVE_RECIPE = "kimi-k2.6-mxfp4"

# One conversion, measured from inside: its own wall time, the transcode time and the device's peak memory.
_CONVERT = """
import json, os, sys, threading, time
import torch
import requant.job as job
import requant
src, dst, recipe, device, threads, report = sys.argv[1:7]
busy, lock = [0.0], threading.Lock()
inner = job._transcode_batch
def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return inner(*args, **kwargs)
    finally:
        with lock:
            busy[0] += time.perf_counter() - start
job._transcode_batch = timed
cuda = device.startswith("cuda")
if cuda:
    torch.cuda.init()
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
requant.convert(src, dst, recipe, device=device, progress=False, jobs=1, threads=int(threads))
wall = time.perf_counter() - start
out = {"pid": os.getpid(), "threads": int(threads) or job.available_cores(), "wall_s": wall, "transcode_busy_s": busy[0],
       "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else 0}
open(report, "w").write(json.dumps(out))
"""

# The code these figures measure (results/device-check.json records it with the commit, where git is present).
MEASURES = (*CONVERSION, *SERVING, "infra/device_check.py", "requant/verification.py", "requant/engines/smoke.py",
            "requant/bench/serve.py", "requant/bench/conversion.py")


def environment(device: str) -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count(),
            "device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["device_memory_gb"] = torch.cuda.get_device_properties(torch.device(device)).total_memory / 1e9
        info["hip"] = getattr(torch.version, "hip", None)
        info["cuda"] = torch.version.cuda
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def conversion_lanes(device: str) -> dict[str, tuple[str, int]]:
    """The conversions compared, by name: (device, transcode threads; 0: every core). With a GPU, the device
    against the CPU; on the CPU lane, one transcode thread against several (two threads on a one-core machine), so
    that a path broken in either scheduling shows as a difference, not as one run compared with itself."""
    if device != "cpu":
        return {device: (device, 0), "cpu": ("cpu", 0)}
    return {"cpu-1-thread": ("cpu", 1), "cpu-threads": ("cpu", max(2, len(os.sched_getaffinity(0))))}


def measured_convert(src: Path, dst: Path, recipe: str, device: str, threads: int) -> dict[str, Any]:
    report = dst.with_suffix(".json")
    from requant.bench.conversion import _run_measured  # the process's own wall time and peak RSS

    measured = _run_measured([sys.executable, "-c", _CONVERT, str(src), str(dst), recipe, device, str(threads),
                              str(report)])
    result = {"device": device, "process_s": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"]}
    result |= json.loads(report.read_text())
    result["transcode_share"] = result["transcode_busy_s"] / result["wall_s"]
    return result


def file_digests(out: Path) -> dict[str, str]:
    """sha256 of every shard as it is on disk (not as the manifest records it)."""
    digests = {}
    for path in sorted(out.glob("*.safetensors")):
        with open(path, "rb") as f:
            digests[path.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def verified(out: Path) -> tuple[bool, list[str]]:
    from requant.errors import VerifyError
    from requant.verification import verify

    try:
        return verify(str(out)).tensors > 0, []
    except VerifyError as exc:
        return False, [str(exc)[:500]]


def tensor_differences(ours: Path, theirs: Path) -> tuple[int, list[str]]:
    """(tensors compared, names whose dtype, shape or bytes differ or that only one side has), tensor by tensor
    whatever the shard layout."""
    import torch
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        def index(root: Path) -> dict[str, Any]:  # tensor name -> its open shard
            names = {}
            for shard in sorted(root.glob("*.safetensors")):
                f = stack.enter_context(safe_open(str(shard), "pt"))
                names.update(dict.fromkeys(f.keys(), f))
            return names

        a, b = index(ours), index(theirs)
        differ = sorted(set(a) ^ set(b))
        for name in sorted(set(a) & set(b)):
            x, y = a[name].get_tensor(name), b[name].get_tensor(name)
            if (x.dtype, x.shape) != (y.dtype, y.shape) or not torch.equal(x.reshape(-1).view(torch.uint8),
                                                                           y.reshape(-1).view(torch.uint8)):
                differ.append(name)
    return len(set(a) | set(b)), differ


def quark_exports(upstream: Path, dst: Path) -> dict[str, Any]:
    """Quark 0.11.2's own file-to-file export of ``upstream`` for every recipe into ``dst / recipe``, on the CPU in
    one process of its own (the oracle); ``{"skipped": why}`` where amd-quark is not installed (a bare GPU machine)."""
    from requant.recipe import load_checks
    from requant.testing.quark_reference import file2file_command, quark_available

    if not quark_available():
        return {"skipped": "amd-quark is not installed here"}
    jobs = [load_checks(recipe).quark.job(str(dst / recipe)) for recipe in RECIPES]
    print(f"device check: Quark's export of {', '.join(RECIPES)} on the CPU", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(file2file_command(str(upstream), jobs), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"Quark's export failed: {proc.stderr[-2000:]}")
    from importlib.metadata import version

    return {"tool": f"amd-quark {version('amd-quark')}", "device": "cpu", "threads": "torch's default",
            "seconds": time.perf_counter() - start, "dir": dst}


def conversion_checks(upstream: Path, work: Path, device: str, quark_dir: Path | None = None) -> dict[str, Any]:
    """Every recipe converted on each of ``conversion_lanes(device)``, compared and verified; each lane's tensors
    compared with Quark's export in ``quark_dir / recipe`` too, where given."""
    bytes_in = sum(p.stat().st_size for p in upstream.glob("*.safetensors"))
    results: dict[str, Any] = {}
    for recipe in RECIPES:
        runs, digests = {}, {}
        for lane, (where, threads) in conversion_lanes(device).items():
            out = work / f"{recipe}-{lane.replace(':', '')}"
            print(f"device check: convert {recipe} on {where}, threads {threads or 'all'}", file=sys.stderr, flush=True)
            run = runs[lane] = measured_convert(upstream, out, recipe, where, threads)
            run["gb_per_s_in"] = bytes_in / run["wall_s"] / 1e9
            run["verify"], run["verify_problems"] = verified(out)
            digests[lane] = file_digests(out)
            if quark_dir is not None:
                run["tensors"], differ = tensor_differences(out, quark_dir / recipe)
                run["equals_quark"], run["differs_from_quark"] = not differ, differ[:8]
            shutil.rmtree(out, ignore_errors=True)
        identical = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1 and len(digests) > 1
        results[recipe] = {"runs": runs, "identical": identical, "bytes_in": bytes_in}
    return results


def conversion_passed(check: dict[str, Any]) -> bool:
    return check["identical"] and all(r["verify"] and r.get("equals_quark", True) for r in check["runs"].values())


def serving_checks(work: Path, device: str, decode_len: int, prompts: int) -> dict[str, Any]:
    import requant
    from requant.bench.serve import model_rates
    from requant.engines.engines import launch, load_engines
    from requant.engines.smoke import smoke_test, task_prompts
    from requant.evaluation.gsm8k import TRAINED_TASK
    from requant.serving.checkpoint import load_checkpoint
    from requant.serving.model import DeepseekV3Text
    from requant.testing.synth import synthesize

    upstream = synthesize(work / "trained", "trained", seed=0, progress=False)
    ckpt = work / SERVE_RECIPE
    requant.convert(str(upstream), str(ckpt), SERVE_RECIPE, progress=False)
    spec = load_engines()["reference"]
    # The CPU server is the reference, the device's the candidate: two servers, each started on its own; on the CPU
    # lane the candidate runs on one torch thread, so its matrix products are not the reference's computation.
    roles = {"reference": ("cpu", None), "candidate": (device, 1 if device == "cpu" else None)}
    servers, described = {}, {}
    try:
        for role, (where, threads) in roles.items():
            print(f"device check: requant serve ({role}) on {where}", file=sys.stderr, flush=True)
            extra = ("--device", where) + (("--threads", str(threads)) if threads else ())
            servers[role] = launch(spec, str(ckpt), served_model_name=f"trained-{role}", log_dir=work / "logs",
                                   extra_args=extra, max_model_len=4096)
            described[role] = {"device": where, "threads": threads or "torch's default",
                               "pid": servers[role].process.pid, "startup_s": servers[role].startup_seconds}
        smoke = smoke_test(servers["candidate"], servers["reference"], prompts=task_prompts(TRAINED_TASK, prompts))
    finally:
        for server in servers.values():
            server.stop()
    sequence = smoke["numeric"]["sequence"]
    rates = {}
    for where in dict.fromkeys(("cpu", device)):
        model = DeepseekV3Text(load_checkpoint(str(ckpt)), where)
        rates[where] = model_rates(model, prompt_len=256, decode_len=decode_len, repeats=2)
        del model
    return {"smoke_passed": smoke["passed"], "failed_checks": [c["name"] for c in smoke["checks"] if not c["passed"]],
            "sequence": {k: sequence.get(k) for k in ("positions", "confident_positions", "top1_agreement",
                                                      "top1_all_positions", "mean_kl", "max_prompt_kl", "exact_match")},
            "servers": described, "tokens_per_s": rates}


def table(r: dict[str, Any]) -> str:
    env = r["environment"]
    lane = "the CPU lane: no GPU; it checks the paths, not a GPU's speed" if env["device"] == "cpu" else env["device"]
    lines = [f"device check on {env.get('device_name', env['device'])} ({lane}), torch {env['torch']}, {env['cores']} "
             f"cores ({env['cpu']}), fixture {r['fixture']['profile']} ({r['fixture']['bytes'] / 1e9:.2f} GB)", "",
             "| recipe | lane | device, threads | wall s | GB/s in | peak RSS MB | peak device MB | transcode share | "
             "verify | equals Quark |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def mark(value: bool | None) -> str:
        return "n/a" if value is None else "ok" if value else "FAIL"

    for recipe, c in r["conversion"].items():
        for name, run in c["runs"].items():
            lines.append(f"| {recipe} | {name} | {run['device']}, {run['threads']} | {run['wall_s']:.1f} | "
                         f"{run['gb_per_s_in']:.2f} | {run['peak_rss_mb']:.0f} | {run['peak_device_bytes'] / 2**20:.0f} | "
                         f"{run['transcode_share']:.2f} | {mark(run['verify'])} | {mark(run.get('equals_quark'))} |")
        lines.append(f"| {recipe} | lanes byte-identical | {c['identical']} | | | | | | | |")
    oracle = r["oracle"]
    lines += ["", f"oracle: {oracle['tool']}'s file-to-file export on the CPU ({oracle['threads']} threads), "
                  f"{oracle['seconds']:.1f} s" if "tool" in oracle else f"oracle: skipped ({oracle['skipped']})"]
    s = r["serving"]
    q = s["sequence"]

    def server(role: str) -> str:
        d = s["servers"][role]
        return f"{role} on {d['device']} ({d['threads']} thread{'' if d['threads'] == 1 else 's'})"

    lines += ["", f"serving: {server('candidate')} against {server('reference')}, two separately started servers: "
                  f"smoke {'passed' if s['smoke_passed'] else 'FAILED ' + str(s['failed_checks'])}"
                  f"; over {q['positions']} positions: top-1 {q['top1_all_positions']:.3f}, mean KL {q['mean_kl']:.5f}, "
                  f"greedy continuations equal {q['exact_match']:.2f}"]
    for where, rate in s["tokens_per_s"].items():
        lines.append(f"  {where}: prefill {rate['prefill_tok_s']:.0f} tok/s, decode {rate['decode_tok_s']:.1f} tok/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", default="k26-layer", choices=["k26-layer", "tiny"])
    parser.add_argument("--experts", type=int, default=64, help="k26-layer: routed experts (384: a whole layer)")
    parser.add_argument("--work", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="fast local storage for the fixture and the outputs (default /dev/shm)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="decode length of the tokens/s measurement")
    parser.add_argument("--prompts", type=int, default=8, help="task prompts the servers are compared on")
    parser.add_argument("--no-oracle", action="store_true",
                        help="skip Quark 0.11.2's export (the third computation; it runs where amd-quark is installed)")
    parser.add_argument("--out", default="device-check.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no GPU")

    from requant.testing.synth import synthesize

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="requant-device-check-", dir=args.work))
    try:
        result: dict[str, Any] = {"environment": environment(args.device) | source_info(MEASURES)}
        print(f"device check: fixture {args.profile} in {work}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        experts = args.experts if args.profile == "k26-layer" else None
        upstream = synthesize(work / "upstream", args.profile, seed=0, progress=False, experts=experts)
        result["fixture"] = {"profile": args.profile, "experts": experts, "seconds": time.perf_counter() - t,
                             "bytes": sum(p.stat().st_size for p in upstream.glob("*.safetensors"))}
        result["oracle"] = ({"skipped": "--no-oracle"} if args.no_oracle else quark_exports(upstream, work / "quark"))
        quark_dir = result["oracle"].pop("dir", None)
        result["conversion"] = conversion_checks(upstream, work, args.device, quark_dir)
        shutil.rmtree(work / "quark", ignore_errors=True)
        shutil.rmtree(upstream, ignore_errors=True)
        result["serving"] = serving_checks(work, args.device, args.decode_tokens, args.prompts)
        result["seconds"] = time.perf_counter() - started
        result["passed"] = (all(map(conversion_passed, result["conversion"].values()))
                            and result["serving"]["smoke_passed"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s; {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
