"""Device check: the requant kernels run on a CUDA/ROCm device and give the same bytes as on the CPU.

Run on a machine with a GPU from the repository root: ``python3 infra/gpu_kernel_check.py``. Needs only
torch (the CPU results are the ones the test suite checks against Quark and compressed-tensors).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from requant.formats.fp8 import quantize_fp8_per_channel
from requant.formats.fused import int4_to_mxfp4
from requant.formats.int4 import dequantize_int4
from requant.formats.mxfp4 import dequantize_mxfp4, quantize_mxfp4


def random_int4(rows: int, cols: int, seed: int, extreme: bool = False):
    g = torch.Generator().manual_seed(seed)
    packed = torch.randint(-(2**31), 2**31 - 1, (rows, cols // 8), dtype=torch.int64, generator=g).to(torch.int32)
    scale = (torch.rand(rows, cols // 32, generator=g) * 0.02 + 1e-4).to(torch.bfloat16)
    if extreme:  # every BF16 exponent, both signs, zero and subnormal scales: exercises the fallback path
        bits = torch.randint(0, 2**16, (rows, cols // 32), dtype=torch.int32, generator=g)
        bits = torch.where(((bits >> 7) & 0xFF) == 0xFF, bits & 0x807F, bits)  # no Inf/NaN
        scale = bits.to(torch.int16).view(torch.bfloat16)
    return packed, scale


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def main() -> int:
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    on_gpu = dev.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch")
    report: dict = {"device": torch.cuda.get_device_name() if on_gpu else dev, "torch": torch.__version__, "checks": {}}
    for name, (rows, cols, extreme) in {"kimi_expert": (2048, 7168, False), "all_scale_classes": (512, 1024, True)}.items():
        packed, scale = random_int4(rows, cols, seed=len(name), extreme=extreme)
        cpu = int4_to_mxfp4(packed, scale, cols)
        gpu = int4_to_mxfp4(packed.to(dev), scale.to(dev), cols)
        ref_gpu = quantize_mxfp4(dequantize_int4(packed.to(dev), scale.to(dev), cols))
        report["checks"][f"fused_{name}_gpu_eq_cpu"] = same(cpu[0], gpu[0]) and same(cpu[1], gpu[1])
        report["checks"][f"reference_{name}_gpu_eq_cpu"] = same(cpu[0], ref_gpu[0]) and same(cpu[1], ref_gpu[1])
    weight = torch.randn(1024, 2048).to(torch.bfloat16)
    cpu8, gpu8 = quantize_fp8_per_channel(weight), quantize_fp8_per_channel(weight.to(dev))
    report["checks"]["fp8_gpu_eq_cpu"] = same(cpu8[0], gpu8[0]) and same(cpu8[1], gpu8[1])
    mx = quantize_mxfp4(weight)
    report["checks"]["mxfp4_decode_gpu_eq_cpu"] = same(dequantize_mxfp4(*mx), dequantize_mxfp4(mx[0].to(dev), mx[1].to(dev)))

    if not on_gpu:
        print(json.dumps(report, indent=2))
        return 0 if all(report["checks"].values()) else 1
    packed, scale = random_int4(2048, 7168, seed=0)
    packed, scale = packed.to(dev), scale.to(dev)
    for rows_per_block in (256, None):
        for _ in range(3):
            int4_to_mxfp4(packed, scale, 7168, rows_per_block=rows_per_block)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            int4_to_mxfp4(packed, scale, 7168, rows_per_block=rows_per_block)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 20
        report[f"fused_ms_rows{rows_per_block}"] = ms
        report[f"fused_gb_per_s_bf16_equiv_rows{rows_per_block}"] = 2048 * 7168 * 2 / ms / 1e6
    bf16 = torch.empty(2048, 7168, dtype=torch.bfloat16, device=dev)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        bf16.clone()
    torch.cuda.synchronize()
    report["bf16_clone_gb_per_s"] = 2048 * 7168 * 2 / ((time.perf_counter() - t) / 20) / 1e9
    print(json.dumps(report, indent=2))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
