"""``requant synth``: a synthetic upstream checkpoint with the layout of a Kimi-K2.6 / DeepseekV3-family release."""

from __future__ import annotations

import argparse

# kept here as well as in requant.testing.synth (which imports torch) so that --help stays fast; a test checks both
PROFILE_NAMES = ("tiny", "trained", "k26-topology", "k26-layer", "k26", "deepseek-v3", "kimi-k2-instruct", "kimi-mxfp4",
                 "kimi-nvfp4", "kimi-nvfp4-modelopt", "kimi-bf16")
SOURCE_NAMES = ("int4", "fp8-block", "mxfp4", "nvfp4", "nvfp4-modelopt", "bf16")


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("synth", help="write a synthetic upstream checkpoint with a Kimi-K2.6 / DeepSeek-V3 layout")
    p.add_argument("dst")
    p.add_argument("--profile", default="tiny", choices=PROFILE_NAMES,
                   help="tiny/k26-topology: K2.6 (INT4 experts), random weights; trained: the model make train-model "
                        "trained (INT4 experts); k26-layer: K2.6's real widths, one dense and one MoE layer (~10.8 GB); "
                        "deepseek-v3 (FP8 blocks, MTP layer), kimi-k2-instruct (FP8 blocks), kimi-mxfp4, kimi-nvfp4, "
                        "kimi-nvfp4-modelopt (NVIDIA's Model Optimizer NVFP4), kimi-bf16: "
                        "the family's other releases at tiny's sizes; k26: the whole model at its real sizes, for "
                        "--layout-only")
    p.add_argument("--source", choices=SOURCE_NAMES,
                   help="store the profile's weights in this upstream format instead (e.g. k26-layer as fp8-block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts", type=int, help="routed experts per MoE layer (default: the profile's; k26-layer: 384)")
    p.add_argument("--layout-only", action="store_true",
                   help="write the shards' headers over holes of their data's size (sparse files: a plan of it has "
                        "the real jobs and bytes; converting it reads zeros)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from requant.testing.synth import synthesize

    print(synthesize(args.dst, args.profile, args.seed, experts=args.experts, source=args.source,
                     layout_only=args.layout_only))
    return 0
