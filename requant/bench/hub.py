"""``requant bench hub`` / ``make bench-hub``: reading an upstream from a Hub against a plain download of the
same bytes, in one run.

The fixture is ``synth --profile k26-layer`` (K2.6's real widths, ``--experts`` routed experts) on tmpfs, published
to requant's local Hub, which runs as its own process (``requant hub serve``), LFS redirects included. Each figure
comes from its own measured process (wall, CPU share, peak RSS):

- download: every shard streamed whole through huggingface_hub's own session (``hf_hub_download`` without the
  write to disk), the bytes discarded: the roofline of the server and the loopback;
- reads from ``hf://``: what every layer job reads, span by span with its read-ahead, and nothing else;
- layer jobs from ``hf://``: every layer job of the plan run one after another on every core, reading its tensors
  by byte range from the Hub (what a Ray worker does), writing its shard to tmpfs;
- the same jobs from the tmpfs directory: the cost of the conversion itself;
- ``requant convert hf://... --local``: the whole command, which also reads every shard once more to check it
  against the Hub's sha256.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from requant.bench.conversion import _run_measured
from requant.bench.provenance import CONVERSION, describe, run_info, write_results
from requant.job import available_cores

RECIPE = "amd-kimi-mxfp4"
# The code these figures measure (requant/io holds the Hub client and server).
MEASURES = (*CONVERSION, "requant/bench/hub.py", "requant/bench/conversion.py", "requant/testing/hubserver.py")
REPO = "bench/k26-layer"

_DOWNLOAD = """
import os, sys
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session
endpoint, repo = sys.argv[1], sys.argv[2]
files = [f for f in HfApi(endpoint=endpoint).list_repo_files(repo) if f.endswith(".safetensors")]
total = 0
for f in files:
    with get_session().stream("GET", hf_hub_url(repo, f, endpoint=endpoint), headers=build_hf_headers()) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes(1 << 20):
            total += len(chunk)
print(total, file=sys.stderr)
"""

# What a layer job reads, read the way it reads it (its spans, READ_AHEAD threads ahead), with no transcoding.
_READS = """
import sys
from requant.io.ranges import CoalescingReader
from requant.io.storage import open_storage
from requant.job import READ_AHEAD, _read_order, write_passes
from requant.planning import build_plan
from requant.recipe import load_recipe
source, recipe = open_storage(sys.argv[1]), sys.argv[2]
for job in build_plan(source, load_recipe(recipe)).jobs:
    for stretch in write_passes(job):
        tasks = list(stretch.tasks)
        order = [e for t in tasks for e in _read_order(t)]
        reader = CoalescingReader(source, [e for t in tasks for e in t.inputs], order=order, ahead=READ_AHEAD)
        for entry in order:
            reader.read(entry)
        reader.close()
"""

_JOBS = """
import sys, tempfile
from pathlib import Path
from requant.io.storage import open_storage
from requant.job import run_job
from requant.planning import build_plan
from requant.recipe import load_recipe
source, recipe, out = open_storage(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
plan = build_plan(source, load_recipe(recipe))
for job in plan.jobs:
    run_job(job, source, out, threads=0)
"""


def run_hub_bench(experts: int, base: str, out: str | None) -> dict[str, Any]:
    from requant.testing.hubserver import publish_dir, start_hub_process
    from requant.testing.synth import synthesize

    work = Path(tempfile.mkdtemp(prefix="requant-bench-hub-", dir=base or None))
    hub = None
    try:
        upstream = synthesize(work / "upstream", "k26-layer", seed=0, progress=True, experts=experts)
        shard_bytes = sum(p.stat().st_size for p in upstream.glob("*.safetensors"))
        publish_dir(work / "hub", REPO, upstream)
        hub, url = start_hub_process(work / "hub", work / "hub.log")
        env_cmd = ["env", f"HF_ENDPOINT={url}", "HF_HUB_DISABLE_XET=1", "HF_HUB_DISABLE_TELEMETRY=1"]
        results: dict[str, Any] = {"run": run_info(measures=MEASURES), "cores": available_cores(), "recipe": RECIPE,
                                   "fixture": {"profile": "k26-layer", "experts": experts, "shard_bytes": shard_bytes,
                                               "where": base or tempfile.gettempdir()}}
        runs = {
            "download": [*env_cmd, sys.executable, "-c", _DOWNLOAD, url, REPO],
            "reads_from_hub": [*env_cmd, sys.executable, "-c", _READS, f"hf://{REPO}@main", RECIPE],
            "jobs_from_hub": [*env_cmd, sys.executable, "-c", _JOBS, f"hf://{REPO}@main", RECIPE, str(work / "o1")],
            "jobs_from_dir": [sys.executable, "-c", _JOBS, str(upstream), RECIPE, str(work / "o2")],
            "convert_from_hub": [*env_cmd, str(Path(sys.executable).with_name("requant")), "convert",
                                 f"hf://{REPO}@main", str(work / "o3"), "--recipe", RECIPE, "--local"],
        }
        for name, cmd in runs.items():
            for d in ("o1", "o2"):
                (work / d).mkdir(exist_ok=True)
            print(f"hub bench: {name}", file=sys.stderr)
            measured = _run_measured(cmd)
            measured["gb_per_s"] = shard_bytes / measured["seconds"] / 1e9
            results[name] = measured
        results["reads_vs_download"] = results["reads_from_hub"]["gb_per_s"] / results["download"]["gb_per_s"]
        results["jobs_vs_download"] = results["jobs_from_hub"]["gb_per_s"] / results["download"]["gb_per_s"]
        results["jobs_hub_vs_dir"] = results["jobs_from_hub"]["gb_per_s"] / results["jobs_from_dir"]["gb_per_s"]
    finally:
        if hub is not None:
            hub.kill()
        shutil.rmtree(work, ignore_errors=True)
    text = render(results)
    write_results(out, "hub", results, text)
    print(text)
    return results


def render(r: dict[str, Any]) -> str:
    f = r["fixture"]
    lines = [f"# Reading an upstream from a Hub (k26-layer, {f['experts']} experts, {f['shard_bytes'] / 1e9:.2f} GB "
             f"of shards on {f['where']}, {r['cores']} cores)", "",
             "| run | seconds | GB/s of shards | CPU % | peak RSS MB |", "|---|---|---|---|---|"]
    for name in ("download", "reads_from_hub", "jobs_from_hub", "jobs_from_dir", "convert_from_hub"):
        m = r[name]
        lines.append(f"| {name} | {m['seconds']:.2f} | {m['gb_per_s']:.2f} | {m['cpu_percent']:.0f} | "
                     f"{m['peak_rss_mb']:.0f} |")
    lines += ["", f"A layer job's range reads from hf:// (its spans, read ahead as it reads them, no transcoding) reach "
                  f"{r['reads_vs_download']:.2f} of a plain download of the same bytes. Whole layer jobs from hf:// reach "
                  f"{r['jobs_vs_download']:.2f} of the download and {r['jobs_hub_vs_dir']:.2f} of the same jobs reading "
                  "tmpfs (where the conversion, not the reads, is the limit, and the Hub's server shares the cores). "
                  "convert_from_hub also reads every shard once more to check it against the Hub's sha256.", "",
              describe(r["run"])]
    return "\n".join(lines) + "\n"
