"""llm-compressor 0.14, the reference implementation of the compressed-tensors targets, as the tests (the oracle) run
it: ``python -m requant.testing.llmc_reference SRC JOBS_JSON`` in llm-compressor's pinned virtualenv (.venv-llmc,
``make llmc-venv``) runs ``model_free_ptq`` for each ``{"dst", "scheme", "ignore"}`` of the JSON list, on the CPU,
one worker. An upstream with a compressed-tensors ``quantization_config`` (Kimi's INT4) is read through
compressed-tensors' own dequantizer (``CompressedTensorsDequantizer``), as llm-compressor's Kimi-K2.6 example does;
a BF16 upstream directly. Nothing of requant is imported in that process but this module.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def run_jobs(src: str, jobs: list[dict[str, Any]]) -> None:
    import torch
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from llmcompressor import model_free_ptq

    torch.set_num_threads(1)
    config = json.loads((Path(src) / "config.json").read_text())
    quantized = any("quantization_config" in part for part in (config, config.get("text_config") or {}))
    for job in jobs:
        converter = CompressedTensorsDequantizer(src) if quantized else None
        with _expert_fusion(job.get("fuse_experts", False)):
            model_free_ptq(src, job["dst"], scheme=job["scheme"], ignore=list(job["ignore"]), max_workers=1,
                           device="cpu", converter=converter)


@contextmanager
def _expert_fusion(enabled: bool):
    """llm-compressor's fused-set tables (partners to load, sets to share a global scale) with the experts' gate_proj
    + up_proj added, restored after."""
    from llmcompressor.entrypoints.model_free import microscale

    if not enabled:
        yield
        return
    mappings, sets = dict(microscale.DEFAULT_FUSED_MAPPINGS), list(microscale._DEFAULT_FUSED_MAPPINGS_LIST)
    microscale.DEFAULT_FUSED_MAPPINGS[r"^(?P<prefix>.+?)\.(?P<mlp>experts\.\d+|shared_experts)\.gate_proj\.weight$"] = \
        [r"{prefix}.{mlp}.up_proj.weight"]
    microscale._DEFAULT_FUSED_MAPPINGS_LIST.append([r"re:.*(experts\.\d+|shared_experts)\.gate_proj\.weight$",
                                                    r"re:.*(experts\.\d+|shared_experts)\.up_proj\.weight$"])
    try:
        yield
    finally:
        microscale.DEFAULT_FUSED_MAPPINGS.clear()
        microscale.DEFAULT_FUSED_MAPPINGS.update(mappings)
        microscale._DEFAULT_FUSED_MAPPINGS_LIST[:] = sets


if __name__ == "__main__":
    run_jobs(sys.argv[1], json.loads(Path(sys.argv[2]).read_text()))
