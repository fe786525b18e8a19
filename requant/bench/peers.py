"""``requant bench peers`` / ``make bench-peers``: requant against the other converters of the same checkpoint, side
by side in one run (issue 24: requant at >= 5x the fastest peer, at a peak RSS no higher than the lightest peer's).

The input is ``synth --profile k26-layer`` (K2.6's real widths, ``--experts`` routed experts) on tmpfs; every
converter runs on it as a whole process of its own, in its own virtualenv:

- Quark 0.11.2's file-to-file export (the project's virtualenv, ``requant.testing.quark_reference``);
- Quark 0.13's, in one process (``device="cpu"``) and in one worker process per core (``device=["cpu"] * N``),
  from .venv-quark13 (``make quark13-venv``);
- llm-compressor 0.14's model-free path (``model_free_ptq`` with compressed-tensors' INT4 dequantizer in front,
  MXFP4 on the routed experts only, the coverage of recipe amd-kimi-mxfp4), from .venv-llmc (``make llmc-venv``);
- ``requant convert --local``, for Quark 0.11 and for Quark 0.13 (``--quark-version 0.13``).

The other vendors' targets (issue 38), each raced against the tools that write its format, on the same input:

- ``ct-mxfp4`` and ``ct-nvfp4a16``: llm-compressor 0.14's ``model_free_ptq`` with the recipe's own
  ``llmcompressor_equivalent`` (scheme and ignore list, ``max_workers`` = cores), against requant (for
  ``ct-nvfp4a16`` also with ``--no-shared-global-scale``, llm-compressor's bytes); for ``ct-mxfp4`` also
  auto-round 0.16's model-free mode (its command line, .venv-autoround: ``make autoround-venv``);
- ``modelopt-nvfp4``: NVIDIA Model Optimizer 0.47's ``mtq.quantize`` and unified export
  (``requant.testing.modelopt_reference``, every thread), against requant.

Each requant run of a target is measured against that target's fastest and lightest peer.

Each figure is the whole process tree's: wall time, CPU time over wall, and peak RSS, the sum over every process of
the tree sampled from /proc (``conversion._run_measured`` reads ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which is
the largest single process's peak: right for one process, an undercount for Quark 0.13's workers; the tree
launcher here records that figure too, as ``largest_process_rss_mb``). A tree's RSS counts pages that its processes
share (torch's libraries) once per process, which is what a second Python process costs in RSS. Each
virtualenv's bare ``python -c "import torch"`` is measured the same way, and each converter's RSS is also given
above its own environment's.

The outputs are checked against each other: requant's against Quark's of the same release, tensor for tensor,
and Quark 0.13's two runs file for file. llm-compressor writes its own format (compressed-tensors'
``mxfp4-pack-quantized``, packed weights named ``weight_packed``), so its files cannot equal Quark's; its tensors
are compared with Quark 0.11.2's under that one rename.
"""

from __future__ import annotations

import filecmp
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requant.bench.provenance import CONVERSION, describe, run_info, write_results
from requant.errors import RequantError
from requant.job import available_cores

RECIPE = "amd-kimi-mxfp4"
# RECIPE (Quark's MXFP4) and the other vendors' targets, each raced by the tools that write its format, in this order;
# `requant bench peers --targets` picks some.
TARGETS = (RECIPE, "ct-mxfp4", "ct-nvfp4a16", "modelopt-nvfp4")
# The code these figures measure: requant, the Quark 0.11 reference, the peers' launchers and their locks.
MEASURES = (*CONVERSION, "requant/bench/peers.py", "requant/bench/conversion.py", "requant/testing/quark_reference.py",
            "requant/testing/modelopt_reference.py", "infra/quark13", "infra/llmcompressor")
ROOT = Path(__file__).resolve().parents[2]
# The virtualenvs of the peers, and the make target that builds each.
ENVS = {"quark13": (".venv-quark13", "make quark13-venv"), "llmc": (".venv-llmc", "make llmc-venv"),
        "autoround": (".venv-autoround", "make autoround-venv")}
PACKAGES = ("torch", "amd-quark", "compressed-tensors", "llmcompressor", "nvidia-modelopt", "auto-round",
            "transformers")
TARGET_SPEEDUP = 5.0  # issue 24: requant at >= 5x the fastest peer, at a peak RSS no higher than the lightest peer's
SAMPLE_SECONDS = 0.1

# Runs a command and measures its whole process tree: /proc sampled every interval for the RSS of every
# descendant (a subreaper, so a descendant whose parent ends stays in the tree), added up; the kernel's figures
# (CPU time, the largest single process's peak RSS) once they are all reaped. Only the stdlib: it runs under the
# project's Python whatever the measured command's environment.
_LAUNCHER = """
import ctypes, json, os, resource, signal, subprocess, sys, threading, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
interval, log, cmd = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
me = os.getpid()

def descendants():
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [me]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out

def memory(pid):  # (VmRSS, RssAnon) in kB; a zombie has neither
    sizes = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    sizes[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        pass
    return sizes.get("VmRSS", 0), sizes.get("RssAnon", 0)

peak = {"rss": 0, "anon": 0, "processes": 0, "samples": 0}
done = threading.Event()

def sample():
    while True:
        pids = descendants()
        sizes = [memory(p) for p in pids]
        peak["rss"] = max(peak["rss"], sum(s[0] for s in sizes))
        peak["anon"] = max(peak["anon"], sum(s[1] for s in sizes))
        peak["processes"] = max(peak["processes"], sum(1 for s in sizes if s[0]))
        peak["samples"] += 1
        if done.wait(interval):
            return

start = time.perf_counter()
with open(log, "wb") as err:
    proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
wall = time.perf_counter() - start
done.set()
sampler.join()
deadline = time.monotonic() + 60  # reap what the command left behind (its rusage counts too)
while True:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0:
        if time.monotonic() > deadline:
            for left in descendants():
                try:
                    os.kill(left, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)
if rc:
    sys.stderr.write(open(log, errors="replace").read()[-3000:])
    sys.exit(rc)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": wall, "cpu_percent": 100 * (usage.ru_utime + usage.ru_stime) / wall,
                  "peak_rss_mb": max(peak["rss"], usage.ru_maxrss) / 1024, "peak_anon_mb": peak["anon"] / 1024,
                  "largest_process_rss_mb": usage.ru_maxrss / 1024, "processes": peak["processes"],
                  "samples": peak["samples"]}))
"""

_VERSIONS = """
import json, sys
from importlib import metadata
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""

# Quark 0.13 with one worker process per device: its own ProcessPoolExecutor (spawn) shares the shards out
# round-robin. requant.testing.quark_reference passes a single device, so the list is passed here.
_QUARK13_WORKERS = """
import json, sys
from quark.torch.quantization.file2file_quantization import quantize_model_per_safetensor
from requant.testing.quark_reference import _config
src, dst, workers, job = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
quantize_model_per_safetensor(src, _config(job["scheme"], job["exclude"], job["layer_config"]), dst,
                              device=["cpu"] * workers)
"""

# llm-compressor's model-free PTQ: compressed-tensors' dequantizer decodes the INT4 experts (to BF16, its default),
# then MXFP4 on every module whose name has .mlp.experts. (the ignore list is what is kept). max_workers are
# threads; on the CPU it quantizes the shards one after another whatever their number.
_LLMC = """
import sys
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
from llmcompressor import model_free_ptq
src, dst, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
model_free_ptq(model_stub=src, save_directory=dst, scheme="MXFP4", ignore=[sys.argv[4]], max_workers=workers,
               device="cpu", converter=CompressedTensorsDequantizer(src))
"""
LLMC_IGNORE = r"re:^(?!.*\.mlp\.experts\.)"  # every module but the routed experts
# The same call with a recipe's llmcompressor_equivalent: scheme, then the ignore list as JSON.
_LLMC_RECIPE = """
import json, sys
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
from llmcompressor import model_free_ptq
src, dst, workers, scheme, ignore = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
model_free_ptq(model_stub=src, save_directory=dst, scheme=scheme, ignore=ignore, max_workers=workers, device="cpu",
               converter=CompressedTensorsDequantizer(src))
"""


def env_python(env: str, root: Path = ROOT) -> str:
    """The Python of a peer's virtualenv; a missing one fails with the make target that builds it."""
    folder, target = ENVS[env]
    python = root / folder / "bin" / "python"
    if not python.exists():
        raise RequantError(f"{python} is missing: `{target}` builds it")
    return str(python)


def _measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Wall time, CPU % and peak RSS of ``cmd``'s whole process tree (see _LAUNCHER); its output goes to ``log``."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(SAMPLE_SECONDS), str(log), *cmd],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _versions(python: str) -> dict[str, str | None]:
    out = subprocess.run([python, "-c", _VERSIONS, *PACKAGES], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def compare_tensors(a: Path, b: Path, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """Tensor for tensor, one at a time: how many ``a`` has, how many differ from ``b``'s (dtype, shape or bytes)
    and the names that only one side has. ``rename`` maps a suffix of ``a``'s names to ``b``'s."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for shard in _shards(d):
            with safe_open(str(shard), "pt") as f:
                out.update({name: shard for name in f.keys()})
        return out

    def renamed(name: str) -> str:
        for old, new in (rename or {}).items():
            if name.endswith(old):
                return name[: -len(old)] + new
        return name

    def raw(t: torch.Tensor) -> tuple:
        return t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    ours, theirs = index(a), index(b)
    mapped = {renamed(n): n for n in ours}
    common = sorted(set(mapped) & set(theirs))
    differ = []
    for name in common:
        with safe_open(str(ours[mapped[name]]), "pt") as f, safe_open(str(theirs[name]), "pt") as g:
            if raw(f.get_tensor(mapped[name])) != raw(g.get_tensor(name)):
                differ.append(name)
    only = sorted(set(mapped) ^ set(theirs))
    return {"tensors": len(ours), "differ": len(differ), "first_differ": differ[:5], "only_one_side": len(only),
            "first_only_one_side": only[:5], "identical": not differ and not only}


def compare_files(a: Path, b: Path) -> dict[str, Any]:
    """Every file of the two directories, byte for byte; a JSON file that differs only in the order of its keys
    (Quark writes its index's weight map in a set's order) is listed apart and counts as identical."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differ = [n for n in names if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, False))]
    reordered = [n for n in differ if n.endswith(".json") and (a / n).is_file() and (b / n).is_file()
                 and json.loads((a / n).read_text()) == json.loads((b / n).read_text())]
    differ = [n for n in differ if n not in reordered]
    return {"files": len(names), "differ": differ, "json_reordered": reordered, "identical": not differ}


def llmc_output(path: Path) -> dict[str, Any]:
    """What llm-compressor's config.json says: its format and whether the upstream's INT4 config is still there."""
    config = json.loads((path / "config.json").read_text())
    top = config.get("quantization_config") or {}
    kept = (config.get("text_config") or {}).get("quantization_config")
    return {"format": top.get("format"), "quant_method": top.get("quant_method"), "ct_version": top.get("version"),
            "keeps_upstream_text_config_quantization": kept is not None,
            "upstream_text_config_format": (kept or {}).get("format")}


@dataclass
class _Race:
    """One bench run's state: the input, the scratch folder, the peers' interpreters and what was measured so far."""

    src: Path
    work: Path
    pythons: dict[str, str]
    cores: int
    results: dict[str, Any]
    out: str | None

    def measure(self, name: str, tool: str, variant: str, env: str, cmd: list[str], peer: bool = True,
                target: str = RECIPE) -> Path:
        """One run of ``target``, recorded under ``name``; ``cmd`` writes its output to work/name, returned."""
        print(f"peers bench: {target}: {tool}, {variant}", file=sys.stderr)
        row = {"tool": tool, "variant": variant, "env": env, "peer": peer, "target": target,
               **_measure(cmd, self.work / "logs" / f"{name}.log")}
        row["rss_over_baseline_mb"] = row["peak_rss_mb"] - self.results["envs"][env]["torch_baseline"]["peak_rss_mb"]
        self.results["runs"][name] = row
        _save(self.results, self.out)
        return self.work / name

    def requant(self, name: str, *options: str, recipe: str = RECIPE) -> list[str]:
        """``requant convert --local`` of the input into work/name."""
        return [sys.executable, "-m", "requant.cli", "convert", str(self.src), str(self.work / name), "--recipe",
                recipe, "--local", *options]

    def same_as(self, name: str, other: str, compared: dict[str, Any]) -> None:
        self.results["runs"][name]["same_as"] = {"run": other, **compared}


def run_peers_bench(experts: int | None, base: str, out: str | None, profile: str = "k26-layer",
                    upstream: str | None = None, targets: tuple[str, ...] = TARGETS) -> dict[str, Any]:
    """Every converter of each of ``targets`` on the same input (``upstream``, or ``synth --profile profile
    --experts experts`` made under ``base``), results/peers.json and peers.md into ``out``."""
    from requant.testing.synth import synthesize

    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise RequantError(f"bench peers: unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    pythons = {"project": sys.executable, **{env: env_python(env) for env in ENVS}}  # fail before any work
    cores = available_cores()
    work = Path(tempfile.mkdtemp(prefix="requant-bench-peers-", dir=base or None))
    try:
        (work / "logs").mkdir()
        if upstream:
            src = Path(upstream)
        else:
            src = synthesize(work / "upstream", profile, seed=0, progress=True, experts=experts)
        results: dict[str, Any] = {
            "run": run_info(measures=MEASURES), "cores": cores, "recipe": RECIPE, "targets": list(targets),
            "fixture": {"profile": None if upstream else profile, "experts": None if upstream else experts,
                        "upstream": str(src),
                        "shard_bytes": sum(p.stat().st_size for p in _shards(src)), "where": str(work.parent)},
            "envs": {}, "runs": {}}
        for env, python in pythons.items():
            print(f"peers bench: baseline, {env}", file=sys.stderr)
            results["envs"][env] = {"python": python, "versions": _versions(python),
                                    "torch_baseline": _measure([python, "-c", "import torch"],
                                                               work / "logs" / f"baseline-{env}.log")}
        race = _Race(src, work, pythons, cores, results, out)
        for target in TARGETS:
            if target in targets:
                RACES[target](race)
        results["ratios"] = ratios(results["runs"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(_save(results, out))
    return results


def _race_quark(race: _Race) -> None:
    """amd-kimi-mxfp4: Quark 0.11.2, Quark 0.13 (one process, one worker per core) and llm-compressor's MXFP4 against
    requant for each Quark release; each output removed once compared (tmpfs holds a few at a time)."""
    from requant.recipe import load_checks
    from requant.testing.quark_reference import file2file_command

    quark = load_checks(RECIPE).quark
    job = {"scheme": quark.scheme, "exclude": list(quark.exclude), "layer_config": dict(quark.layer_config) or None}
    src, work, cores, py13, llmc = race.src, race.work, race.cores, race.pythons["quark13"], race.pythons["llmc"]
    path13 = ["env", f"PYTHONPATH={ROOT}"]
    q11 = race.measure("quark-0.11", "Quark 0.11.2", "file-to-file, 1 process", "project",
                       file2file_command(str(src), [{"dst": str(work / "quark-0.11"), **job}]))
    r11 = race.measure("requant-0.11", "requant", "convert --local (Quark 0.11 target)", "project",
                       race.requant("requant-0.11"), peer=False)
    race.same_as("requant-0.11", "quark-0.11", compare_tensors(r11, q11))
    lc = race.measure("llmc", "llm-compressor 0.14", f"model_free_ptq MXFP4, max_workers={cores} (threads)", "llmc",
                      ["env", "HF_HUB_OFFLINE=1", llmc, "-c", _LLMC, str(src), str(work / "llmc"), str(cores),
                       LLMC_IGNORE])
    race.results["llmc_output"] = llmc_output(lc)
    race.same_as("llmc", "quark-0.11", {"rename": {".weight_packed": ".weight"},
                                        **compare_tensors(lc, q11, {".weight_packed": ".weight"})})
    for d in (q11, r11, lc):
        shutil.rmtree(d)
    q13 = race.measure("quark-0.13", "Quark 0.13", "file-to-file, 1 process", "quark13",
                       [*path13, py13, *file2file_command(str(src), [{"dst": str(work / "quark-0.13"), **job}])[1:]])
    q13n = race.measure("quark-0.13-workers", "Quark 0.13", f"file-to-file, {cores} worker processes", "quark13",
                        [*path13, py13, "-c", _QUARK13_WORKERS, str(src), str(work / "quark-0.13-workers"),
                         str(cores), json.dumps(job)])
    race.same_as("quark-0.13-workers", "quark-0.13", compare_files(q13n, q13))
    shutil.rmtree(q13n)
    r13 = race.measure("requant-0.13", "requant", "convert --local --quark-version 0.13", "project",
                       race.requant("requant-0.13", "--quark-version", "0.13"), peer=False)
    race.same_as("requant-0.13", "quark-0.13", compare_tensors(r13, q13))
    for d in (q13, r13):
        shutil.rmtree(d)


# auto-round 0.16's model-free mode as its command line runs it: MXFP4 weights (round to nearest), written in
# compressed-tensors' format, from Kimi's INT4 (which it dequantizes itself); these layers ignored, so that, beside
# its own defaults (embeddings, lm_head, vision, routers, MTP), only the routed experts are quantized, as in ct-mxfp4.
AUTOROUND_IGNORE = "self_attn,shared_experts,mlp.gate_proj,mlp.up_proj,mlp.down_proj,mlp.gate$"


def _race_autoround(target: str, race: _Race) -> Path:
    """auto-round's model-free MXFP4 of the input; its output folder."""
    name = f"autoround-{target}"
    bin_dir = Path(race.pythons["autoround"]).parent
    return race.measure(name, "auto-round 0.16", "model-free MXFP4, --format llm_compressor", "autoround",
                 ["env", "HF_HUB_OFFLINE=1", str(bin_dir / "auto-round"), str(race.src), "--model_free",
                  "--scheme", "MXFP4", "--format", "llm_compressor", "--device", "cpu",
                  "--ignore_layers", AUTOROUND_IGNORE, "--output_dir", str(race.work / name)], target=target)


def _race_llmc(target: str, race: _Race) -> None:
    """A compressed-tensors target: llm-compressor's model_free_ptq given the recipe's llmcompressor_equivalent,
    against requant (for NVFP4 also with llm-compressor's separate global scales, --no-shared-global-scale)."""
    from requant.recipe import load_checks

    equivalent = load_checks(target).llmcompressor
    name = f"llmc-{target}"
    lc = race.measure(name, "llm-compressor 0.14", f"model_free_ptq {equivalent.scheme}, max_workers={race.cores} "
                      "(threads)", "llmc",
                      ["env", "HF_HUB_OFFLINE=1", race.pythons["llmc"], "-c", _LLMC_RECIPE, str(race.src),
                       str(race.work / name), str(race.cores), equivalent.scheme, json.dumps(list(equivalent.ignore))],
                      target=target)
    variants = [(f"requant-{target}", "convert --local", ())]
    if "nvfp4" in equivalent.scheme.lower():
        variants.append((f"requant-{target}-separate", "convert --local --no-shared-global-scale",
                         ("--no-shared-global-scale",)))
    for run, variant, options in variants:
        ours = race.measure(run, "requant", variant, "project", race.requant(run, *options, recipe=target), peer=False,
                            target=target)
        race.same_as(run, name, compare_tensors(ours, lc))
        if target == "ct-mxfp4":  # auto-round writes this format too
            theirs = _race_autoround(target, race)
            race.same_as(f"autoround-{target}", run, compare_tensors(theirs, ours))
            shutil.rmtree(theirs)
        shutil.rmtree(ours)
    shutil.rmtree(lc)


def _race_modelopt(target: str, race: _Race) -> None:
    """A Model Optimizer target: its mtq.quantize and unified export of the decoded weights
    (requant.testing.modelopt_reference, every core's thread), against requant."""
    from requant.recipe import load_checks

    equivalent = load_checks(target).modelopt
    name = f"modelopt-{target}"
    jobs = race.work / f"{name}.json"
    jobs.write_text(json.dumps([{"dst": str(race.work / name), "scheme": equivalent.scheme,
                                 "enable": list(equivalent.enable), "threads": race.cores}]))
    mo = race.measure(name, "Model Optimizer 0.47", f"mtq.quantize + unified export ({equivalent.scheme}), "
                      f"{race.cores} threads", "llmc",
                      ["env", f"PYTHONPATH={ROOT}", "HF_HUB_OFFLINE=1", race.pythons["llmc"], "-m",
                       "requant.testing.modelopt_reference", str(race.src), str(jobs)], target=target)
    run = f"requant-{target}"
    ours = race.measure(run, "requant", "convert --local", "project", race.requant(run, recipe=target), peer=False,
                        target=target)
    race.same_as(run, name, compare_tensors(ours, mo))
    for d in (mo, ours):
        shutil.rmtree(d)


RACES = {RECIPE: _race_quark, "ct-mxfp4": functools.partial(_race_llmc, "ct-mxfp4"),
         "ct-nvfp4a16": functools.partial(_race_llmc, "ct-nvfp4a16"),
         "modelopt-nvfp4": functools.partial(_race_modelopt, "modelopt-nvfp4")}


def _target(row: dict[str, Any]) -> str:
    return row.get("target", RECIPE)  # results recorded before the other targets were raced had only RECIPE's


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each requant run against its target's fastest peer (wall) and lightest (peak RSS), and whether it meets the
    target; ``targets`` names each target's fastest and lightest peer."""
    out: dict[str, Any] = {"targets": {}}
    for target in dict.fromkeys(_target(r) for r in runs.values()):
        peers = {name: r for name, r in runs.items() if r["peer"] and _target(r) == target}
        if not peers:
            continue
        fastest = min(peers, key=lambda n: peers[n]["seconds"])
        lightest = min(peers, key=lambda n: peers[n]["peak_rss_mb"])
        out["targets"][target] = {"fastest_peer": fastest, "lightest_peer": lightest}
        for name, r in runs.items():
            if r["peer"] or _target(r) != target:
                continue
            speedup = peers[fastest]["seconds"] / r["seconds"]
            rss = r["peak_rss_mb"] / peers[lightest]["peak_rss_mb"]
            out[name] = {"target": target, "speedup_vs_fastest": speedup, "rss_vs_lightest": rss,
                         "target_met": speedup >= TARGET_SPEEDUP and rss <= 1.0}
    return out


def _same_cell(r: dict[str, Any], runs: dict[str, dict[str, Any]]) -> str:
    same = r.get("same_as")
    if not same:
        return ""
    other = runs.get(same["run"])
    against = f"{other['tool']} ({other['variant']})" if other else same["run"]
    if "files" in same:
        reordered = same.get("json_reordered", [])
        verdict = (f"files differ: {', '.join(same['differ'][:3])}" if not same["identical"] else
                   f"all {same['files']} files byte-identical" if not reordered else
                   f"all {same['files']} files byte-identical but {', '.join(reordered)} (the same JSON, its keys in "
                   "another order)")
    elif same["identical"]:
        verdict = f"all {same['tensors']} tensors byte-identical"
    else:
        verdict = (f"{same['differ']} of {same['tensors']} tensors differ, {same['only_one_side']} on one side only "
                   f"(first: {', '.join(same['first_differ'] + same['first_only_one_side'])})")
    if same.get("rename"):
        verdict += " with " + ", ".join(f"{k} read as {v}" for k, v in same["rename"].items())
    return f"{against}: {verdict}"


def render(r: dict[str, Any]) -> str:
    f = r["fixture"]
    fixture = f"synth --profile {f['profile']}" if f["profile"] else f["upstream"]
    if f.get("experts"):
        fixture += f" --experts {f['experts']}"
    lines = [f"# requant and its peers ({fixture}: {f['shard_bytes'] / 1e9:.2f} GB of shards, outputs on {f['where']}, "
             f"{r['cores']} cores)"]
    runs, ratio = r["runs"], r.get("ratios") or {}
    for target in dict.fromkeys(_target(m) for m in runs.values()):
        lines += ["", f"## {target}", "",
                  "| tool | variant | wall s | CPU % | processes | peak RSS MB | RSS over torch baseline MB | "
                  "output identical to |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for m in runs.values():
            if _target(m) == target:
                lines.append(f"| {m['tool']} | {m['variant']} | {m['seconds']:.1f} | {m['cpu_percent']:.0f} | "
                             f"{m['processes']} | {m['peak_rss_mb']:.0f} | {m['rss_over_baseline_mb']:.0f} | "
                             f"{_same_cell(m, runs)} |")
        best = ratio.get("targets", {}).get(target)
        if not best:
            continue
        fastest, lightest = runs[best["fastest_peer"]], runs[best["lightest_peer"]]
        lines += ["", f"Fastest peer: {fastest['tool']} ({fastest['variant']}), {fastest['seconds']:.1f} s; lightest: "
                      f"{lightest['tool']} ({lightest['variant']}), {lightest['peak_rss_mb']:.0f} MB. Target: "
                      f">= {TARGET_SPEEDUP:g}x the fastest at a peak RSS no higher than the lightest's.", ""]
        for name, q in ratio.items():
            if name != "targets" and q["target"] == target:
                lines.append(f"- {runs[name]['tool']} {runs[name]['variant']}: {q['speedup_vs_fastest']:.2f}x the "
                             f"fastest peer, peak RSS {q['rss_vs_lightest']:.2f} of the lightest peer's: target "
                             f"{'met' if q['target_met'] else 'not met'}")
    lines += ["", "Peak RSS: every process of the run's tree, added up (sampled every "
                  f"{SAMPLE_SECONDS:g} s; never below the kernel's peak of its largest process). The baseline is "
                  "`python -c \"import torch\"` in the same virtualenv: " +
              ", ".join(f"{env} {e['torch_baseline']['peak_rss_mb']:.0f} MB (torch {e['versions']['torch']})"
                        for env, e in r["envs"].items()) + "."]
    lc = r.get("llmc_output")
    if lc:
        kept = (f"keeps the upstream's INT4 quantization_config ({lc['upstream_text_config_format']}) under "
                "text_config beside it" if lc["keeps_upstream_text_config_quantization"] else
                "has no quantization_config left under text_config")
        lines += ["", f"llm-compressor writes compressed-tensors' {lc['format']} (quant_method {lc['quant_method']}, "
                      f"version {lc['ct_version']}): a top-level quantization_config, and its config.json {kept}. Its "
                      f"packed weights are named weight_packed where Quark's are weight, so its files cannot equal "
                      f"Quark's; the comparison with {RECIPE}'s Quark outputs reads those names as Quark's."]
    lines += ["", f"Measured {describe(r['run'])}.", "",
              "Virtualenvs: " + "; ".join(f"{env}: " + ", ".join(f"{k} {v}" for k, v in e["versions"].items() if v)
                                          for env, e in r["envs"].items()) + "."]
    return "\n".join(lines) + "\n"


def _save(results: dict[str, Any], out: str | None) -> str:
    """Write what was measured so far (a long run that fails late keeps its earlier figures)."""
    text = render(results)
    write_results(out, "peers", results, text)
    return text
