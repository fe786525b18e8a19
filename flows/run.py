"""``make flow-run``: the main job on embedded defaults, on a fresh machine with no other set-up.

Starts SeaweedFS (unless ``make services-up`` already did), writes the ``tiny`` synthetic upstream into
it, runs the requantize flow with the seed card's recipe, verifies the published checkpoint and
prints where it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from requant import seaweed
from requant.io.s3 import S3Storage
from requant.synth import synthesize

STATE = Path(".services/seaweed.json")


def upload_dir(local: Path, uri: str) -> None:
    storage = S3Storage(uri)
    storage.ensure_bucket()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put_file(path.relative_to(local).as_posix(), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="kimi-k2.6-mxfp4")
    parser.add_argument("--profile", default="tiny", choices=["tiny", "k26-topology"])
    parser.add_argument("--bucket", default="requant")
    args = parser.parse_args(argv)

    server = seaweed.load_state(STATE)
    started_here = server is None
    if started_here:
        server = seaweed.start(Path(".services/seaweed-data"))
        print(f"SeaweedFS S3 on {server.endpoint} (pid {server.pid})")
    os.environ.update(server.env())
    upstream = f"s3://{args.bucket}/upstream/{args.profile}"
    output = f"s3://{args.bucket}/checkpoints/{args.profile}/{args.recipe}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = synthesize(Path(tmp) / args.profile, args.profile, seed=0, progress=True)
            upload_dir(local, upstream)
        from flows.requantize import requantize

        summary = requantize(upstream=upstream, output=output, recipe=args.recipe, upstream_id=f"synthetic/{args.profile}")
        print(f"\ncheckpoint: {output}  ({summary['tensors']} tensors, {summary['jobs']} layer jobs, "
              f"{summary['skipped']} resumed, verified)")
        if not started_here:
            print(f"S3 endpoint: {server.endpoint} (make services-down stops it)")
    finally:
        if started_here:
            seaweed.stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
