"""transformers' DeepseekV3ForCausalLM built from one of our checkpoints: the oracle for the serving model."""

from __future__ import annotations

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from requant.serving.checkpoint import LoadedCheckpoint


def hf_model(ckpt: LoadedCheckpoint) -> DeepseekV3ForCausalLM:
    """Same weights (already dequantized in ``ckpt``) in transformers' module tree, eager attention, FP32."""
    text = {k: v for k, v in ckpt.text_config.items() if k not in ("quantization_config", "architectures", "model_type")}
    config = DeepseekV3Config(**text)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # the per-expert loop (grouped_mm has no float64 path)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).to(torch.float32).eval()
    w = ckpt.weights
    state = {}
    for name, tensor in w.items():
        if ".mlp.experts." in name:
            continue
        state[name] = tensor
    for i in range(config.first_k_dense_replace, config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        gate_up, down = [], []
        for e in range(config.n_routed_experts):
            gate_up.append(torch.cat([w[f"{p}.{e}.gate_proj.weight"], w[f"{p}.{e}.up_proj.weight"]]))
            down.append(w[f"{p}.{e}.down_proj.weight"])
        state[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{p}.down_proj"] = torch.stack(down)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith(("inv_freq",))]:
        raise AssertionError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    return model
