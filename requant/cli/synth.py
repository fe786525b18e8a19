"""``requant synth``: a synthetic upstream checkpoint with Kimi-K2.6's layout."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("synth", help="write a synthetic upstream checkpoint with Kimi-K2.6's layout")
    p.add_argument("dst")
    p.add_argument("--profile", default="tiny", choices=["tiny", "trained", "k26-topology", "k26-layer"],
                   help="tiny/k26-topology: random weights; trained: the model make train-model trained (INT4 experts); "
                        "k26-layer: K2.6's real widths, one dense and one MoE layer (~10.8 GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts", type=int, help="routed experts per MoE layer (default: the profile's; k26-layer: 384)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.testing.synth import synthesize

    print(synthesize(args.dst, args.profile, args.seed, experts=args.experts))
    return 0
