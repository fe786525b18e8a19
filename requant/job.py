"""Running one layer job: read its tensors by byte range, transcode, write its own output shard.

This is the single job function both the local path (``requant convert --local``) and the
distributed flow execute, so their outputs are byte-identical by construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from requant.errors import CheckpointError
from requant.formats.int4 import dequantize_int4
from requant.formats.table import UNQUANTIZED, WEIGHT_FORMATS
from requant.io.ranges import CoalescingReader
from requant.io.safetensors import SafetensorsWriter
from requant.io.storage import Storage
from requant.plan import LayerJob, TensorTask

SNR_SAMPLE_ROWS = 64  # rows per tensor used for the error statistics (evenly spaced, deterministic)


@dataclass(frozen=True)
class TensorStat:
    """Error of a re-quantized module against its high-precision (BF16) weights."""

    name: str
    target: str
    snr_db: float
    rows_sampled: int
    rows: int


@dataclass(frozen=True)
class JobResult:
    job: str
    output_file: str
    sha256: str
    size: int
    bytes_in: int
    seconds: float
    host: str
    tensors: dict[str, dict] = field(default_factory=dict)  # output name -> {dtype, shape}
    sources: dict[str, list[str]] = field(default_factory=dict)  # upstream name -> output names
    stats: tuple[TensorStat, ...] = ()


def result_to_json(result: JobResult) -> bytes:
    data = dataclasses.asdict(result)
    data["stats"] = [dict(s, snr_db=None if math.isinf(s["snr_db"]) else s["snr_db"]) for s in data["stats"]]
    return json.dumps(data, sort_keys=True).encode()


def result_from_json(raw: bytes) -> JobResult:
    data = json.loads(raw)
    stats = tuple(TensorStat(**dict(s, snr_db=math.inf if s["snr_db"] is None else s["snr_db"])) for s in data.pop("stats"))
    return JobResult(**data, stats=stats)


def run_job(job: LayerJob, source: Storage, out_dir: Path, device: str = "cpu", threads: int = 1,
            fsync: bool = False) -> JobResult:
    """Convert one job's tensors into ``out_dir / job.output_file``; ``threads`` row threads per matrix."""
    start = time.perf_counter()
    path = Path(out_dir) / job.output_file
    writer = SafetensorsWriter(path, job.specs, metadata={"requant_job": job.name})
    stats: list[TensorStat] = []
    reader = CoalescingReader(source, [e for t in job.tasks for e in t.inputs])
    try:
        # in the output file's order, so the writer hashes as it writes instead of reading the shard back;
        # inputs are named alike (safetensors orders by dtype, then name), so spans are still read in order
        position = {name: i for i, name in enumerate(writer.order())}
        for task in sorted(job.tasks, key=lambda t: min(position[s.name] for s in t.outputs)):
            outputs, stat = transcode(task, reader, device, threads)
            for spec, tensor in zip(task.outputs, outputs):
                writer.write(spec.name, tensor)
            if stat is not None:
                stats.append(stat)
        digest = writer.close(fsync=fsync)
    except BaseException:
        writer.abort()
        raise
    return JobResult(
        job=job.name,
        output_file=job.output_file,
        sha256=digest,
        size=path.stat().st_size,
        bytes_in=job.bytes_in,
        seconds=time.perf_counter() - start,
        host=socket.gethostname(),
        tensors={s.name: {"dtype": s.dtype, "shape": list(s.shape)} for s in job.specs},
        sources={e.name: [s.name for s in t.outputs] for t in job.tasks for e in t.inputs},
        stats=tuple(stats),
    )


def transcode(task: TensorTask, source: CoalescingReader, device: str = "cpu", threads: int = 1) -> tuple[list[torch.Tensor], TensorStat | None]:
    """One task's output tensors (in ``task.outputs`` order) and, if it quantizes, its error stats."""
    if task.kind == "copy":
        (entry,) = task.inputs
        tensor = source.read(entry)
        _check_finite(tensor, f"{source.uri}/{entry.file}", entry.name)
        return [tensor], None
    if task.kind == "int4":
        packed, scale = _read_int4(task, source)
        packed, scale = packed.to(device), scale.to(device)
        in_features = task.shape[1]
        fmt = WEIGHT_FORMATS.get(task.target)
        if fmt is not None and fmt.from_int4 is not None:
            out = list(fmt.from_int4(packed, scale, in_features, threads=threads))
        else:
            weight = dequantize_int4(packed, scale, in_features)
            out = [weight] if task.target == UNQUANTIZED else list(fmt.encode(weight))
        reference = lambda rows: dequantize_int4(packed[rows], scale[rows], in_features)  # noqa: E731
    else:
        (entry,) = task.inputs
        weight = source.read(entry)
        _check_finite(weight, f"{source.uri}/{entry.file}", entry.name)
        weight = weight.to(device)
        out = list(WEIGHT_FORMATS[task.target].encode(weight))
        reference = lambda rows: weight[rows]  # noqa: E731
    stat = None if task.target == UNQUANTIZED else _error_stat(task, out, reference)
    return [t.cpu() for t in out], stat


def _read_int4(task: TensorTask, source: CoalescingReader) -> tuple[torch.Tensor, torch.Tensor]:
    packed_e, scale_e, shape_e = task.inputs
    shape = source.read(shape_e).tolist()
    if tuple(shape) != task.shape:
        raise CheckpointError(f"{source.uri}/{shape_e.file}", f"weight_shape is {shape}, config implies {list(task.shape)}", shape_e.name)
    scale = source.read(scale_e)
    _check_finite(scale, f"{source.uri}/{scale_e.file}", scale_e.name)
    return source.read(packed_e), scale


# Exponent fields by float type, viewed as integers of the same width: all ones means Inf or NaN.
_EXPONENT_MASKS = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
                   torch.float32: (torch.int32, 0x7F800000)}


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. On the raw bits for BF16/FP16/FP32 (the largest masked exponent field is
    below all-ones): several times faster than ``torch.isfinite``, which widens every element first."""
    if not tensor.is_floating_point() or not tensor.numel():
        return True
    if tensor.dtype in _EXPONENT_MASKS and tensor.is_contiguous():
        view, mask = _EXPONENT_MASKS[tensor.dtype]
        return int(tensor.view(view).bitwise_and(mask).max()) < mask
    return bool(torch.isfinite(tensor).all())


def _check_finite(tensor: torch.Tensor, file: str, name: str) -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(file, f"{bad} NaN/Inf values", name)


def _error_stat(task: TensorTask, out: list[torch.Tensor], reference) -> TensorStat:
    rows = task.shape[0]
    step = max(1, rows // SNR_SAMPLE_ROWS)
    sample = torch.arange(0, rows, step, device=out[0].device)[:SNR_SAMPLE_ROWS]
    ref = reference(sample).to(torch.float32)
    sampled = out[0].view(torch.uint8)[sample].view(out[0].dtype)  # as bytes: CPU indexing has no FP8 kernel
    got = WEIGHT_FORMATS[task.target].decode(sampled, out[1][sample])
    signal = float(ref.double().pow(2).sum())
    noise = float((ref.double() - got.double()).pow(2).sum())
    snr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
    return TensorStat(task.name, task.target, snr, len(sample), rows)
