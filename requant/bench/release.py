"""``requant bench release`` / ``make bench-release``: a release from S3 to a Hub against a plain upload of the same
bytes to the same Hub, in one run.

The fixture is ``synth --profile k26-layer`` (K2.6's real widths, ``--experts`` routed experts) converted with
``amd-kimi-mxfp4`` on tmpfs, put into SeaweedFS (data on tmpfs) and released to requant's local Hub, which runs as
its own process (``requant hub serve``, its repositories on tmpfs). Each figure comes from its own measured process
(wall, CPU share, peak RSS, and the bytes it wrote to local storage):

- plain upload: huggingface_hub's ``create_commit`` of the checkpoint's files as open local files (the client reads
  each file twice too: once to hash it, once to send it): the roofline of the client, the server and the loopback;
- release from S3: ``requant release s3://... hf://...`` (``--force``: the fixture has no evaluation), every file
  streamed from S3, checked against the manifest, uploaded, committed and the commit's listing verified.

Local disk: the release runs with ``HOME``, ``TMPDIR`` and ``HF_HOME`` in an empty directory on disk, whose size
afterwards is reported with the ``write_bytes`` the kernel counted for the process (``/proc/self/io``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from requant.bench.conversion import _run_measured
from requant.bench.provenance import describe, run_info, write_results

RECIPE = "amd-kimi-mxfp4"
MEASURES = ("requant/release", "requant/io/stream.py", "requant/io/s3.py", "requant/card",
            "requant/bench/release.py", "requant/testing/hubserver.py")
TOKEN = "hf_requant_bench_write"

# Runs a module (argv: the file to record into, the module, its arguments) in this process's place and records,
# at exit, what the kernel counted it writing to storage.
_COUNTED = """
import atexit, json, os, runpy, sys
def _io():
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    with open(io_file, "w") as f:
        json.dump({k: int(v) for k, v in fields.items()}, f)
io_file = sys.argv[1]
atexit.register(_io)
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__")
"""

_PLAIN = """
import sys
from pathlib import Path
from huggingface_hub import CommitOperationAdd, HfApi
endpoint, repo, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
api = HfApi(endpoint=endpoint)
api.create_repo(repo, exist_ok=True)
files = [p for p in sorted(folder.rglob("*")) if p.is_file() and ".requant" not in p.parts]
ops = [CommitOperationAdd(p.relative_to(folder).as_posix(), open(p, "rb")) for p in files]
api.create_commit(repo, ops, commit_message="plain upload")
"""


# What the release process holds before it reads a byte: the CLI with the flow (Prefect) and the release's modules.
_IMPORTS = "import requant.flows.cli, requant.release.upload, requant.card, huggingface_hub"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_release_bench(experts: int, base: str, out: str | None) -> dict[str, Any]:
    import requant
    from requant.io.transfer import upload_dir
    from requant.testing import seaweed
    from requant.testing.hubserver import start_hub_process
    from requant.testing.synth import synthesize

    work = Path(tempfile.mkdtemp(prefix="requant-bench-release-", dir=base or None))
    disk_home = Path(tempfile.mkdtemp(prefix="requant-bench-release-home-", dir="."))
    hub = s3 = None
    try:
        upstream = synthesize(work / "upstream", "k26-layer", seed=0, progress=True, experts=experts)
        checkpoint = work / "checkpoint"
        requant.convert(str(upstream), str(checkpoint), RECIPE)
        shutil.rmtree(upstream)
        files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in checkpoint.rglob("*")
                 if p.is_file() and ".requant" not in p.parts}
        total = sum(files.values())
        s3 = seaweed.start(work / "seaweed")
        env = {**os.environ, **s3.env(), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": TOKEN}
        os.environ.update(s3.env())
        upload_dir(checkpoint, "s3://bench/checkpoint")
        hub, url = start_hub_process(work / "hub", work / "hub.log", write_tokens=[TOKEN])
        env["HF_ENDPOINT"] = url
        results: dict[str, Any] = {"run": run_info(measures=MEASURES), "recipe": RECIPE,
                                   "fixture": {"profile": "k26-layer", "experts": experts, "files": len(files),
                                               "bytes": total, "largest_file": max(files.values()),
                                               "where": base or tempfile.gettempdir()}}
        io_file = work / "io.json"
        counted = [sys.executable, "-c", _COUNTED, str(io_file)]
        runs = {
            "imports": [sys.executable, "-c", _IMPORTS],
            "plain_upload": [sys.executable, "-c", _PLAIN, url, "bench/plain", str(checkpoint)],
            "release_from_s3": [*counted, "requant.flows.cli", "release", "s3://bench/checkpoint",
                                "hf://bench/release", "--force", "benchmark fixture: not evaluated"],
        }
        for name, cmd in runs.items():
            print(f"release bench: {name}", file=sys.stderr)
            run_env = {**env, "HOME": str(disk_home), "TMPDIR": str(disk_home), "HF_HOME": str(disk_home / "hf")}
            measured = _measured(cmd, run_env)
            if name != "imports":
                measured["mb_per_s"] = total / measured["seconds"] / 1e6
            if io_file.exists():
                io = json.loads(io_file.read_text())
                measured["write_bytes"] = io["write_bytes"]
                measured["local_disk_bytes"] = _size(disk_home)
                io_file.unlink()
            results[name] = measured
        results["release_vs_plain"] = results["release_from_s3"]["mb_per_s"] / results["plain_upload"]["mb_per_s"]
        results["release_rss_over_imports_mb"] = (results["release_from_s3"]["peak_rss_mb"]
                                                  - results["imports"]["peak_rss_mb"])
    finally:
        if hub is not None:
            hub.kill()
        if s3 is not None:
            seaweed.stop(s3)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(disk_home, ignore_errors=True)
    text = render(results)
    write_results(out, "release", results, text)
    print(text)
    return results


def _measured(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return _run_measured(cmd)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def render(r: dict[str, Any]) -> str:
    f = r["fixture"]
    lines = [f"# Releasing to a Hub (k26-layer, {f['experts']} experts, {RECIPE}: {f['files']} files, "
             f"{f['bytes'] / 1e9:.2f} GB, largest {f['largest_file'] / 1e9:.2f} GB; S3 and the Hub on {f['where']})", "",
             "| run | seconds | MB/s | CPU % | peak RSS MB | local disk written |", "|---|---|---|---|---|---|"]
    for name in ("plain_upload", "release_from_s3"):
        m = r[name]
        disk = f"{m['write_bytes']} B (+{m['local_disk_bytes']} B in HOME/TMPDIR/HF_HOME)" if "write_bytes" in m else "n/a"
        lines.append(f"| {name} | {m['seconds']:.2f} | {m['mb_per_s']:.0f} | {m['cpu_percent']:.0f} | "
                     f"{m['peak_rss_mb']:.0f} | {disk} |")
    lines += ["", f"The release from S3 (streamed, checked against the manifest, uploaded, committed, its listing "
                  f"verified) reaches {r['release_vs_plain']:.2f} of a plain upload of the same files from tmpfs with "
                  "huggingface_hub's create_commit. Both read each file twice (the client hashes before it uploads); the "
                  "Hub and SeaweedFS share the machine's cores with them.", "",
              f"Peak RSS of the release: {r['release_from_s3']['peak_rss_mb']:.0f} MB, of which "
              f"{r['imports']['peak_rss_mb']:.0f} MB is the process before it reads a byte (the command line with "
              f"Prefect, the client, the card's modules): the release itself adds "
              f"{r['release_rss_over_imports_mb']:.0f} MB for a largest file of {f['largest_file'] / 1e9:.2f} GB. Local "
              "disk: what the kernel counted the process writing (`write_bytes`) and what it left in HOME, TMPDIR and "
              "HF_HOME.", "", describe(r["run"])]
    return "\n".join(lines) + "\n"
