"""``requant serve``: the OpenAI-compatible reference server for a checkpoint."""

from __future__ import annotations

import argparse

from requant.api_key import api_key


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="OpenAI-compatible reference server for a checkpoint (dir or s3://)")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=api_key(),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $REQUANT_API_KEY; prefer the variable, "
                        "command lines are visible to other users)")
    p.add_argument("--served-model-name", help="model name clients send (default: the checkpoint's last path part)")
    p.add_argument("--max-model-len", type=int, default=8192, help="prompt + completion tokens per request")
    p.add_argument("--max-pending", type=int, default=16, help="requests in flight before 429")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may stall (then 408)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device the model runs on (cpu, cuda, cuda:1; ROCm: cuda)")
    p.add_argument("--log-level", default="warning")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.serving.server import serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
          served_model_name=args.served_model_name, max_model_len=args.max_model_len,
          max_body_bytes=args.max_body_bytes, max_pending=args.max_pending, log_level=args.log_level,
          body_timeout_s=args.body_timeout, device=args.device)
    return 0
