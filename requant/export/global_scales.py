"""Which modules share one NVFP4 global scale (compressed-tensors' ``weight_global_scale``, Model Optimizer's
``weight_scale_2``), by module name.

vLLM and SGLang load some modules fused into one weight with one global scale: an expert's gate_proj and up_proj
(w13; vLLM keeps the gate's scale for both and warns when they differ), the shared experts' and the dense MLP's
gate_up_proj, and MLA's fused q_a_proj + kv_a_proj_with_mqa (vLLM takes the larger of the two). Model Optimizer's
export gives the same sets one scale (the modules that read the same input: ``requantize_resmooth_fused_llm_layers``),
and requant does by default (a recipe's ``shared_global_scale``). llm-compressor 0.14's ``model_free_ptq`` shares
it only where its own mapping names the modules: in this layout, the dense MLP's gate_proj and up_proj.
"""

from __future__ import annotations

import re

ENGINE_GLOBAL_SCALE_GROUPS = (
    re.compile(r"^(?P<base>.*\.mlp\.experts\.\d+)\.(gate|up)_proj$"),
    re.compile(r"^(?P<base>.*\.mlp\.shared_experts)\.(gate|up)_proj$"),
    re.compile(r"^(?P<base>.*\.mlp)\.(gate|up)_proj$"),
    re.compile(r"^(?P<base>.*\.self_attn)\.(q_a_proj|kv_a_proj_with_mqa)$"),
)
EXPERT_W13 = 0  # the index of ENGINE_GLOBAL_SCALE_GROUPS' first set: a routed expert's gate_proj + up_proj
LLMCOMPRESSOR_GLOBAL_SCALE_GROUPS = (
    re.compile(r"^(?P<base>.*\.mlp)\.(gate|up)_proj$"),
)


def global_scale_group(module: str, shared: bool = True) -> tuple[int, str] | None:
    """The set of modules ``module`` shares its global scale with, as a key (None: it has its own): the engines'
    fused sets when ``shared``, llm-compressor's otherwise."""
    for i, pattern in enumerate(ENGINE_GLOBAL_SCALE_GROUPS if shared else LLMCOMPRESSOR_GLOBAL_SCALE_GROUPS):
        if match := pattern.match(module):
            return i, match["base"]
    return None
