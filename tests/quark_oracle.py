"""Run AMD Quark 0.11's own file-to-file export (the reference output) in a separate process.

Usage: python tests/quark_oracle.py SRC DST SCHEME PATTERN [PATTERN ...]

Quark sets torch's global default dtype from config.json and compiles kernels on first import, so
the tests call it through this script instead of importing it into the test process.
"""

import sys


def main() -> None:
    src, dst, scheme, *exclude = sys.argv[1:]
    from quark.torch.quantization.config.template import LLMTemplate
    from quark.torch.quantization.file2file_quantization import quantize_model_per_safetensor

    config = LLMTemplate.get("kimi_k25").get_config(scheme=scheme, exclude_layers=exclude)
    quantize_model_per_safetensor(src, config, dst, device="cpu")


if __name__ == "__main__":
    main()
