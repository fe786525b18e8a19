"""requant bench layer's roofline and stage profile: the roofline script on real files, the table from a results
dict of the recorded shape, and the stage seconds a conversion reports."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import requant
from requant.bench.layer import _ROOFLINE, render
from requant.job import JobResult, result_from_json, result_to_json
from requant.stages import STAGES, describe


def test_the_roofline_copies_every_shard_and_hashes_what_it_read_and_wrote(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i, size in enumerate((3 << 20, 9 << 20, 1)):
        (src / f"model-{i}.safetensors").write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    (src / "config.json").write_text("{}")
    printed = subprocess.run([sys.executable, "-c", _ROOFLINE, str(src), str(dst), "2"], check=True,
                             capture_output=True, text=True).stdout
    digests = json.loads(printed)
    assert sorted(p.name for p in dst.iterdir()) == sorted(digests) == sorted(p.name for p in src.glob("*.safetensors"))
    for f in src.glob("*.safetensors"):
        assert (dst / f.name).read_bytes() == f.read_bytes()
        assert digests[f.name] == [hashlib.sha256(f.read_bytes()).hexdigest()] * 2  # what it read, what it wrote


def _measured(seconds: float) -> dict:
    return {"seconds": seconds, "cpu_percent": 150.0, "peak_rss_mb": 900.0}


def test_the_table_divides_by_the_parallel_roofline_and_shows_the_stages():
    place = {"bytes_in": 2_000_000_000, "bytes_out": 1_900_000_000, "where": "/dev/shm/x",
             "roofline": _measured(2.0), "roofline_one_thread": _measured(3.0), "roofline_coreutils": _measured(6.0),
             "requant": {**_measured(5.0), "of_roofline": 0.4}, "requant_1_core": {**_measured(8.0), "of_roofline": 0.25},
             "all_cores_speedup": 1.6,
             "stages": {"1": {"wall": 8.0, "hash_inputs": 1.5, "stage_transcode": 5.0, "stage_write": 0.5,
                              "largest_job": {"job": "layer-001", "bytes_in": 1_500_000_000, "seconds": 3.0}},
                        "2": {"wall": 5.0, "hash_inputs": 1.5, "stage_transcode": 5.5, "stage_write": 0.6,
                              "largest_job": {"job": "layer-001", "bytes_in": 1_500_000_000, "seconds": 2.5}}}}
    text = render({"fixture": {"experts": 32, "bytes": 2_000_000_000}, "recipe": "amd-kimi-mxfp4", "cores": 2,
                   "note": "test", "tmpfs": place})
    assert "| tmpfs | roofline: read + SHA-256 in, write + SHA-256 out, 2 threads | 2.0 | 1000 | 150 | 900 |  |" in text
    assert "| tmpfs | requant convert --local (2 cores) | 5.0 | 400 | 150 | 900 | 0.40 |" in text
    assert "| wall | 8.0 | 5.0 |" in text
    assert ("| its largest job (layer-001) alone | 3.0 (500 MB/s in, 0.50 of the roofline's) | "
            "2.5 (600 MB/s in, 0.60 of the roofline's) |") in text
    assert "| transcode: decode, encode, checks (transcode threads) | 5.0 (0.62) | 5.5 (1.10) |" in text
    # the roofline's 2.0 s at 150% CPU (3.0 CPU s) and the 5.0 s transcode on one thread, over 2 cores: 4.0 s
    assert ("- tmpfs: the most a conversion can reach here: 0.50 of the roofline (4.0 s: the roofline's 3.0 CPU s and "
            "the transcode's 5.0 s on one thread, over 2 cores, nothing else; requant: 0.40)") in text


def test_a_conversion_reports_where_its_time_went(tiny_upstream, tmp_path):
    summary = requant.convert(str(tiny_upstream), str(tmp_path / "out"), "amd-kimi-mxfp4", progress=False, jobs=1)
    timings = summary.timings
    assert timings["hash_inputs"] > 0
    for stage in ("read", "transcode", "snr", "write", "hash_out"):
        assert timings[f"stage_{stage}"] > 0, (stage, timings)
    assert {k.removeprefix("stage_") for k in timings if k.startswith("stage_")} <= set(STAGES)
    assert timings["stage_snr"] < timings["stage_transcode"]  # a part of it
    assert f"transcode {timings['stage_transcode']:.1f} s" in describe(timings)
    result = JobResult("j", "f", hashlib.sha256().hexdigest(), 1, 1, 1.0, "h", stages=(("read", 0.5), ("write", 0.25)))
    assert result_from_json(result_to_json(result)).stages == result.stages
