"""Constants and helpers shared by the engine lane's fixtures and tests."""

from __future__ import annotations

from pathlib import Path

from requant.io.safetensors import sha256_file

HERE = Path(__file__).resolve().parent
RECIPES = ("bf16-staging", "amd-kimi-mxfp4", "fp8-reference", "kimi-k2.6-mxfp4", "amd-kimi-k25-mxfp4",
           "amd-kimi-k25-mxfp4-attn-fp8")
ROUTER_ONLY = HERE / "router-only-mxfp4.yaml"
MAX_MODEL_LEN = 4096  # 3-shot GSM8K prompts of the synthetic tokenizer plus 256 generated tokens


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
