"""The benchmarks' CPU accounting for multi-process runs, against the kernel's own rusage of the same processes."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

from requant.bench.cpu import CpuSampler

# A parent that burns ~0.6 s of CPU itself and starts two children that burn ~0.4 s each, waiting for them: the
# kernel then adds the children's CPU time to the parent's, and the parent's to ours once we wait for it.
TREE = """
import subprocess, sys, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
kids = [subprocess.Popen([sys.executable, "-c", "import sys; sys.argv[0] = 'worker'; exec(sys.argv[1])",
                          "import time\\nend = time.process_time() + 0.4\\nwhile time.process_time() < end: pass"])
        for _ in range(2)]
burn(0.6)
for k in kids:
    k.wait()
"""


def test_parts_add_up_to_the_kernels_accounting_of_the_same_processes():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-c", TREE])
    classify = lambda cmdline: "workers" if "process_time() + 0.4" in cmdline else None  # noqa: E731
    with CpuSampler({"parent": proc.pid}, classify=classify, interval=0.05) as sampler:
        proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    kernel = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    parts = sampler.seconds()
    assert set(parts) == {"parent", "workers"}
    # Each process loses what it ran after its last sample (an interval, more on a loaded machine), never more:
    # without the children the sum would be ~0.6 of the kernel's 1.4 s.
    assert parts["workers"] >= 2 * (0.4 - 0.05)                      # both children, less a sampling interval each
    assert 0.75 * kernel <= sum(parts.values()) <= kernel + 0.05
    summary = sampler.summary()
    assert summary["cores"] == os.cpu_count() and 0 < summary["machine_busy"] <= 1
    assert summary["wall_seconds"] > 0
