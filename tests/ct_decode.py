"""compressed-tensors 0.20's own decode of an upstream to BF16, run in .venv-quark13 (the oracle of requant's FP8-block
and MXFP4 decodes): ``python tests/ct_decode.py SRC DST``. FP8-block checkpoints (``weight_scale_inv``) go through
its ``FP8BlockDequantizer`` converter, compressed-tensors ones through ``CompressedTensorsDequantizer``; both run on
the CPU through ``convert_checkpoint``.

Two patches. One for a bug of the converter: an FP8 weight whose input dimension is not a multiple of the block comes out
of ``FP8BlockDequantizer`` as a non-contiguous slice, which safetensors refuses to save; the values are computed by
compressed-tensors and only made contiguous here. (DeepSeek-V3's and Kimi-K2's input dimensions are all multiples of
128; the tiny profiles' are not.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer, FP8BlockDequantizer


class ContiguousFP8BlockDequantizer(FP8BlockDequantizer):
    def _create_dequantized_weight(self, weight, weight_scale_inv):
        return super()._create_dequantized_weight(weight, weight_scale_inv).contiguous()


def main(src: str, dst: str) -> None:
    config = json.loads((Path(src) / "config.json").read_text())
    quant = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if quant["quant_method"] == "fp8":
        block = tuple(quant.get("weight_block_size", (128, 128)))
        converter = ContiguousFP8BlockDequantizer.from_pretrained(src, weight_block_size=block)
    else:
        converter = CompressedTensorsDequantizer(src, dtype=torch.bfloat16)
    convert_checkpoint(src, dst, converter, max_workers=1, device="cpu")
    # compressed-tensors removes the top-level quantization_config of what it decoded, not one nested in text_config
    # (where Kimi-K2.5/K2.6 keep theirs): the BF16 checkpoint must not claim to be quantized
    out = Path(dst) / "config.json"
    decoded = json.loads(out.read_text())
    if decoded.get("text_config", {}).pop("quantization_config", None) is not None:
        out.write_text(json.dumps(decoded, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
