"""AMD Quark 0.11, the reference implementation of the target format, used two ways by the tests.

* In process: ``quark_quantize_weight`` (requant.quark_reference) runs the same per-tensor sequence
  as Quark's file-to-file exporter (observer -> ``scaled_real_quantize`` -> pack -> E8M0 scale).
* As a script: ``python tests/quark_oracle.py SRC JOBS_JSON`` runs Quark's own
  ``quantize_model_per_safetensor`` for each ``{"dst", "scheme", "exclude"}`` in the JSON list. A
  separate process, because that function sets torch's global default dtype from config.json.
"""

from __future__ import annotations

import json
import sys

from requant.quark_reference import quark_quantize_weight  # noqa: F401 (re-exported for the tests)

# Exclude patterns written the way AMD writes them (Quark's kimi_k25 template), per recipe: these are
# what a Quark user would pass for the same coverage, independent of requant's own class table.
AMD_KIMI_EXCLUDE = ["*self_attn*", "*mlp.gate", "*lm_head", "*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj",
                    "*shared_experts*", "*mm_projector*", "*vision_tower*"]
QUARK_EQUIVALENT = {
    "kimi-k2.6-mxfp4": ("mxfp4", [p for p in AMD_KIMI_EXCLUDE if p != "*mlp.gate"]),
    "amd-kimi-mxfp4": ("mxfp4", AMD_KIMI_EXCLUDE),
    "fp8-reference": ("ptpc_fp8", AMD_KIMI_EXCLUDE),
    "bf16-staging": ("mxfp4", ["*"]),  # everything excluded: Quark only decompresses
}


def quark_config_dict(scheme: str, exclude: list[str]) -> dict:
    from quark.torch.quantization.config.template import LLMTemplate

    return LLMTemplate.get("kimi_k25").get_config(scheme=scheme, exclude_layers=exclude).to_dict()


def main() -> None:
    src, jobs = sys.argv[1], json.loads(sys.argv[2])
    from quark.torch.quantization.config.template import LLMTemplate
    from quark.torch.quantization.file2file_quantization import quantize_model_per_safetensor

    for job in jobs:
        config = LLMTemplate.get("kimi_k25").get_config(scheme=job["scheme"], exclude_layers=job["exclude"])
        quantize_model_per_safetensor(src, config, job["dst"], device="cpu")


if __name__ == "__main__":
    main()
