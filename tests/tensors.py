"""Reading a checkpoint's tensors for byte-for-byte comparisons with an oracle's output (the safetensors library
reads them, not requant)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in ``directory``, by name."""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, whatever its dtype."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(ours: Path, theirs: Path) -> dict[str, torch.Tensor]:
    """Both checkpoints hold the same tensors, name for name, dtype, shape and byte for byte; returns ours."""
    a, b = load_tensors(ours), load_tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert raw(a[name]) == raw(b[name]), name
    return a


def engine_fused_names(exclude: list[str]) -> list[str]:
    """The names requant adds to Quark's ``exclude`` (written out here, not taken from requant): the fused modules
    SGLang and vLLM build whose every shard Quark excluded."""
    names, added = set(exclude), set()
    for name in names:
        parent = name.rsplit(".", 1)[0]
        if name.endswith(".gate_proj") and f"{parent}.up_proj" in names:
            added.add(f"{parent}.gate_up_proj")
        if name.endswith(".q_a_proj") and f"{parent}.kv_a_proj_with_mqa" in names:
            added |= {f"{parent}.fused_qkv_a_proj", f"{parent}.fused_qkv_a_proj_with_mqa"}
    return sorted(added - names)


def _nan_rows(tensor: torch.Tensor) -> set[int]:
    return set(torch.isnan(tensor.to(torch.float32)).any(dim=1).nonzero().flatten().tolist())


def quark13_divergence(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> list[str]:
    """The FP8 weights where requant's ``--quark-version 0.13`` output and Quark 0.13's export differ, after asserting
    that they differ only as documented (docs/recipes.md): rows whose BF16 amax is below about 2**-125, which Quark 0.13
    writes as NaN with an FP32 scale of eps (its BF16-rounded scale underflows) and requant finite, with every other row
    and scale equal; every other tensor is byte-identical."""
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert (ours[name].dtype, ours[name].shape) == (theirs[name].dtype, theirs[name].shape), name
    differ = {name for name in ours if raw(ours[name]) != raw(theirs[name])}
    diverged = sorted(n for n in differ if not n.endswith("_scale"))
    assert differ == set(diverged) | {f"{n}_scale" for n in diverged}
    for name in diverged:
        a, b = ours[name], theirs[name]
        assert a.dtype == torch.float8_e4m3fn, name
        rows = _nan_rows(b)
        assert rows and not _nan_rows(a), name
        keep = [r for r in range(a.shape[0]) if r not in rows]
        assert raw(a.view(torch.uint8)[keep]) == raw(b.view(torch.uint8)[keep]), name
        scale_ours, scale_theirs = ours[f"{name}_scale"], theirs[f"{name}_scale"]
        assert torch.equal(scale_ours[keep], scale_theirs[keep]), name
        assert (scale_ours[sorted(rows)] == torch.finfo(torch.float32).eps).all(), name
    return diverged
