"""``requant mirror``: a Hub revision copied into S3 or a directory, each file checked; resumable."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("mirror", help="copy a Hub revision (hf://ORG/REPO@REV) into s3://... or a directory as "
                                           "snapshots/<commit>/ + refs/<branch>, each file checked; resumable")
    p.add_argument("src", help="hf://ORG/REPO@REVISION (a branch, tag or commit)")
    p.add_argument("dst", help="s3://bucket/prefix or a directory")
    p.add_argument("--workers", type=int, default=4, help="files copied at once (default 4)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from requant.io.mirror import mirror_local

    with tqdm(desc="mirror", unit=" files") as bar:
        summary = mirror_local(args.src, args.dst, workers=args.workers, on_file=lambda _: bar.update())
    print(f"mirrored {summary['source']} into {summary['snapshot']}: {summary['files']} files, "
          f"{summary['copied']} copied, {summary['files'] - summary['copied']} already there")
    return 0
