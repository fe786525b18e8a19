"""``make device-wheels``: the wheels a bare GPU machine needs to run ``infra/device_check.py``, into
``.device-wheels/`` (ignored by git; carried to the machine).

The GPU machines this project is lent (see issue 26) have Python 3.12, torch, Triton, safetensors, numpy, PyYAML
and transformers (with huggingface_hub, tokenizers and tqdm), and no network. What ``requant convert``, ``verify``
and ``serve`` import besides those is listed here, pinned to the versions installed in this checkout's
environment, and downloaded for CPython 3.12 on manylinux x86-64, without their dependencies (the list is the
closure). On the machine: ``pip install --no-deps --no-index .device-wheels/*.whl``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# What convert/verify/serve/synth and the smoke test import besides the machine's own packages; their
# dependencies are added from the installed metadata (the closure), minus what the machine has.
ROOTS = ("compressed-tensors", "fastapi", "uvicorn", "httpx", "jsonschema", "psutil")
ON_THE_MACHINE = {"torch", "triton", "numpy", "safetensors", "pyyaml", "transformers", "huggingface-hub", "tokenizers",
                  "tqdm", "regex", "filelock", "packaging", "requests", "urllib3", "charset-normalizer", "fsspec",
                  "sympy", "networkx", "jinja2", "markupsafe", "mpmath", "setuptools"}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
LIMIT = 64 << 20  # what the device tool carries in all, the working tree included


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure(python_version: str) -> list[str]:
    """``name==version`` of every root and its run-time dependencies (markers evaluated for ``python_version``),
    versions as installed here."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    seen, todo = {}, list(ROOTS)
    while todo:
        name = _norm(todo.pop())
        if name in seen or name in ON_THE_MACHINE or name.startswith("nvidia-"):
            continue
        seen[name] = metadata.version(name)
        for raw in metadata.requires(name) or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return [f"{name}=={version}" for name, version in sorted(seen.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".device-wheels")
    parser.add_argument("--python-version", default="3.12")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", args.python_version, "--implementation", "cp",
           *[arg for p in PLATFORMS for arg in ("--platform", p)], *closure(args.python_version)]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {dest} (the device tool carries at most "
          f"{LIMIT >> 20} MiB with the working tree)")
    if size > LIMIT // 2:
        raise SystemExit(f"{dest}: {size / 2**20:.1f} MiB leaves too little of the {LIMIT >> 20} MiB for the tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
