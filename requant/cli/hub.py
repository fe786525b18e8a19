"""``requant hub serve|publish``: a local Hugging Face Hub for demos and tests."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("hub", help="a local Hugging Face Hub for demos and tests (point HF_ENDPOINT at it)")
    sub = p.add_subparsers(dest="hub_command", required=True)
    serve = sub.add_parser("serve", help="serve the repositories under ROOT until Ctrl-C: downloads, and the writes "
                                          "huggingface_hub makes (create_repo, upload_file/create_commit over LFS, "
                                          "branches, pull requests)")
    serve.add_argument("root")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8090)
    serve.add_argument("--write-token", action="append", metavar="TOKEN",
                       help="a token that may write (create repos, upload, commit, branch; and read private repos); "
                            "repeat it for several. Without it any hf_... token may write; with it other tokens are "
                            "read-only (403 on writes)")
    serve.set_defaults(run=run_serve)
    publish = sub.add_parser("publish", help="commit a directory as the new head of a branch of ORG/REPO under ROOT "
                                             "(a running `hub serve` sees it at once)")
    publish.add_argument("root")
    publish.add_argument("repo", help="ORG/REPO")
    publish.add_argument("dir", help="the directory whose files the commit holds")
    publish.add_argument("--branch", default="main")
    publish.add_argument("--message", default="Upload checkpoint")
    publish.set_defaults(run=run_publish)


def run_serve(args: argparse.Namespace) -> int:
    import threading

    from requant.testing import hubserver

    Path(args.root).mkdir(parents=True, exist_ok=True)
    with hubserver.serve_hub(args.root, host=args.host, port=args.port, write_tokens=args.write_token) as hub:
        print(f"serving {args.root}: export HF_ENDPOINT={hub.url}  (Ctrl-C stops)", flush=True)
        threading.Event().wait()
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from requant.testing import hubserver

    commit = hubserver.publish_dir(args.root, args.repo, args.dir, branch=args.branch, message=args.message)
    print(f"{args.repo}@{args.branch} is now {commit}")
    return 0
