"""``requant release SRC hf://ORG/REPO[@BRANCH]``: a published, evaluated checkpoint as one verified commit on the Hub."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "release", help="upload an evaluated checkpoint to the Hugging Face Hub as one verified commit",
        description="Release a published checkpoint (a directory or s3://) to a Hub model repository: only if its "
                    "evaluation PASSed (see `requant evaluate`), with a model card rendered for the release, streamed "
                    "from storage, resumable, in one commit verified against the manifest. The token comes from "
                    "HF_TOKEN or `hf auth login`; HF_ENDPOINT selects the Hub.")
    p.add_argument("source", metavar="SRC", help="the checkpoint: a directory or s3://bucket/prefix")
    p.add_argument("target", metavar="hf://ORG/REPO[@BRANCH]", help="the repository (created when missing) and branch "
                   "(default main)")
    p.add_argument("--private", action="store_true", help="create the repository private (no effect if it exists)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--force", metavar="REASON", help="release although the evaluation did not PASS (or there is "
                   "none); the card says so, and why")
    p.add_argument("--overwrite", action="store_true", help="replace a branch that holds another model's files")
    p.add_argument("--message", help="the commit's title (default: recipe, upstream and its revision)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.release import ReleaseOptions, release

    result = release(args.source, args.target, ReleaseOptions(private=args.private, create_pr=args.create_pr,
                                                              force=args.force, overwrite=args.overwrite,
                                                              message=args.message))
    if args.force and result.forced:
        print(f"warning: released past the gate (evaluation: {result.verdict}): {result.forced}")
    if not result.changed:
        print(f"unchanged: {result.target.uri} already holds this checkpoint at commit {result.commit} ({result.url})")
        return 0
    sent = f"{len(result.sent)} files sent ({result.bytes_sent / 1e9:.2f} GB by LFS)"
    deleted = f", {len(result.deleted)} stale files deleted" if result.deleted else ""
    if result.pull_request:
        print(f"pull request: {result.pull_request} (commit {result.commit}; {sent}{deleted}), verified")
    else:
        print(f"released: {result.url} ({sent}{deleted}), verified against the manifest")
    return 0
