"""The GPU path in one run (``make device-check``): whole layer jobs and the reference server on a device, each
compared with the CPU on the same machine.

1. A fixture on fast local storage: ``synth --profile k26-layer`` (K2.6's real widths, ``--experts`` routed
   experts) or, for CI's CPU lane, ``--profile tiny``.
2. For the MXFP4 and the FP8 recipe: ``convert --local`` with ``--device DEVICE`` and with the CPU (every core),
   each in its own measured process: wall time, GB/s in, peak host RSS, peak device memory, and the share of the
   job's wall time spent in transcoding (host-to-device copy, kernels, copy back, summed over the transcode
   threads). The outputs must be byte-identical and ``verify`` must pass on both.
3. The trained model (MXFP4) served by ``requant serve --device DEVICE`` and by ``requant serve`` on the CPU: the
   smoke test's checks with the CPU server as the reference (greedy continuations scored token by token: top-1
   agreement, KL, exact match, on the task's prompts), and prefill/decode tokens/s of the model on each device.
4. One JSON (``--out``) and a short table.

On a bare GPU machine (Python 3.12, torch, safetensors, numpy, PyYAML, transformers): ``pip install --no-deps
--no-index .device-wheels/*.whl`` first (``make device-wheels`` downloads them here), then run this file from
the repository root with ``PYTHONPATH=.``. Exit status 1 when a comparison fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
import json, sys, threading, time
import torch
import requant.job as job
from requant.convert import run_local
src, dst, recipe, device, report = sys.argv[1:6]
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
run_local(src, dst, recipe, device=device, progress=False, jobs=1)
wall = time.perf_counter() - start
out = {"wall_s": wall, "transcode_busy_s": busy[0],
       "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else 0}
open(report, "w").write(json.dumps(out))
"""

# The code these figures measure (results/device-check.json records it with the commit, where git is present).
MEASURES = (*CONVERSION, *SERVING, "infra/device_check.py", "requant/verify.py", "requant/engines/smoke.py",
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


def measured_convert(src: Path, dst: Path, recipe: str, device: str) -> dict[str, Any]:
    report = dst.with_suffix(".json")
    from requant.bench.conversion import _run_measured  # the process's own wall time and peak RSS

    measured = _run_measured([sys.executable, "-c", _CONVERT, str(src), str(dst), recipe, device, str(report)])
    result = {"process_s": measured["seconds"], "peak_rss_mb": measured["peak_rss_mb"]} | json.loads(report.read_text())
    result["transcode_share"] = result["transcode_busy_s"] / result["wall_s"]
    return result


def shard_digests(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "requant-manifest.json").read_text())
    return {name: entry["sha256"] for name, entry in manifest["outputs"].items() if name.endswith(".safetensors")}


def conversion_checks(upstream: Path, work: Path, device: str) -> dict[str, Any]:
    from requant.verify import verify

    bytes_in = sum(p.stat().st_size for p in upstream.glob("*.safetensors"))
    results: dict[str, Any] = {}
    for recipe in RECIPES:
        runs = {}
        for where in dict.fromkeys((device, "cpu")):
            out = work / f"{recipe}-{where.replace(':', '')}"
            print(f"device check: convert {recipe} on {where}", file=sys.stderr, flush=True)
            runs[where] = measured_convert(upstream, out, recipe, where)
            runs[where]["gb_per_s_in"] = bytes_in / runs[where]["wall_s"] / 1e9
            runs[where]["verify"] = verify(str(out))["tensors"] > 0
            runs[where]["digests"] = shard_digests(out)
        identical = len({json.dumps(r["digests"], sort_keys=True) for r in runs.values()}) == 1
        for r in runs.values():
            r.pop("digests")
        results[recipe] = {"runs": runs, "identical": identical, "bytes_in": bytes_in}
        for where in runs:
            shutil.rmtree(work / f"{recipe}-{where.replace(':', '')}", ignore_errors=True)
    return results


def serving_checks(work: Path, device: str, decode_len: int, prompts: int) -> dict[str, Any]:
    from requant.bench.serve import model_rates
    from requant.convert import convert_local
    from requant.engines.engines import launch, load_engines
    from requant.engines.smoke import smoke_test, task_prompts
    from requant.evaluation.gsm8k import TRAINED_TASK
    from requant.serving.checkpoint import load_checkpoint
    from requant.serving.model import DeepseekV3Text
    from requant.synth import synthesize

    upstream = synthesize(work / "trained", "trained", seed=0, progress=False)
    ckpt = work / SERVE_RECIPE
    convert_local(str(upstream), str(ckpt), SERVE_RECIPE, progress=False)
    spec = load_engines()["reference"]
    servers = {}  # the CPU server is the reference, the device's the candidate (both on the CPU in CI)
    try:
        for role, where in (("reference", "cpu"), ("candidate", device)):
            print(f"device check: requant serve on {where}", file=sys.stderr, flush=True)
            servers[role] = launch(spec, str(ckpt), served_model_name=f"trained-{role}", log_dir=work / "logs",
                                   extra_args=("--device", where), max_model_len=4096)
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
            "startup_s": {role: s.startup_seconds for role, s in servers.items()}, "tokens_per_s": rates}


def table(r: dict[str, Any]) -> str:
    env = r["environment"]
    lines = [f"device check: {env.get('device_name', env['device'])}, torch {env['torch']}, {env['cores']} cores "
             f"({env['cpu']}), fixture {r['fixture']['profile']} ({r['fixture']['bytes'] / 1e9:.2f} GB)", "",
             "| recipe | where | wall s | GB/s in | peak RSS MB | peak device MB | transcode share | verify |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe, c in r["conversion"].items():
        for where, run in c["runs"].items():
            lines.append(f"| {recipe} | {where} | {run['wall_s']:.1f} | {run['gb_per_s_in']:.2f} | "
                         f"{run['peak_rss_mb']:.0f} | {run['peak_device_bytes'] / 2**20:.0f} | "
                         f"{run['transcode_share']:.2f} | {'ok' if run['verify'] else 'FAIL'} |")
        lines.append(f"| {recipe} | outputs identical | {c['identical']} | | | | | |")
    s = r["serving"]
    q = s["sequence"]
    lines += ["", f"serving: smoke vs the CPU server {'passed' if s['smoke_passed'] else 'FAILED ' + str(s['failed_checks'])}"
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
    parser.add_argument("--out", default="device-check.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no GPU")

    from requant.synth import synthesize

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
        result["conversion"] = conversion_checks(upstream, work, args.device)
        shutil.rmtree(upstream, ignore_errors=True)
        result["serving"] = serving_checks(work, args.device, args.decode_tokens, args.prompts)
        result["seconds"] = time.perf_counter() - started
        result["passed"] = (all(c["identical"] and all(r["verify"] for r in c["runs"].values())
                                for c in result["conversion"].values()) and result["serving"]["smoke_passed"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']:.0f} s; {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
