"""Running one layer job: read its tensors by byte range, transcode, write its own output shard.

This is the single job function both the local path (``requant convert --local``) and the
distributed flow execute, so their outputs are byte-identical by construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from requant import stages
from requant.constants import E8M0_NAN, FP8_E4M3_NAN_BITS
from requant.errors import CheckpointError
from requant.formats.finite import all_finite
from requant.formats.fp8_block import dequantize_fp8_block_checked, dequantize_fp8_block_rows, non_power_of_two
from requant.formats.fused import int4_mxfp4_error_sums
from requant.formats.fused_nvfp4 import int4_amax
from requant.formats.int4 import dequantize_int4
from requant.formats.mxfp4 import dequantize_mxfp4
from requant.formats.nvfp4 import tensor_amax
from requant.formats.source import NVFP4_DECODERS
from requant.formats.table import INT4_DECODE_DTYPE, UNQUANTIZED
from requant.io.ranges import CoalescingReader
from requant.io.safetensors import SafetensorsWriter, TensorEntry, layout
from requant.io.storage import Storage
from requant.planning import LayerJob, TensorTask

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
    """What one finished job alone knows: its shard's digest and size, timings, error statistics. The shard's
    tensors and their upstream sources are the job's plan (``LayerJob.specs`` and its tasks' inputs), so they
    are not carried back (for K2.6 that is ~10^5 entries through Ray and into every job record)."""

    job: str
    output_file: str
    sha256: str
    size: int
    bytes_in: int
    seconds: float
    host: str
    stats: tuple[TensorStat, ...] = ()
    etag: str = ""  # the object store's ETag of the shard when it was streamed there (see pipeline.completed)
    stages: tuple[tuple[str, float], ...] = ()  # seconds per stage, summed over threads (requant.stages)


def result_to_json(result: JobResult) -> bytes:
    # fields one level deep by hand: dataclasses.asdict deep-copies every tensor entry of the job first
    data = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    data["stats"] = [dict(vars(s), snr_db=None if math.isinf(s.snr_db) else s.snr_db) for s in result.stats]
    data["stages"] = dict(result.stages)
    return json.dumps(data, sort_keys=True).encode()


def result_from_json(raw: bytes) -> JobResult:
    data = json.loads(raw)
    stats = tuple(TensorStat(**dict(s, snr_db=math.inf if s["snr_db"] is None else s["snr_db"])) for s in data.pop("stats"))
    stages_seconds = tuple(sorted(data.pop("stages", {}).items()))
    return JobResult(**{f.name: data[f.name] for f in dataclasses.fields(JobResult) if f.name in data}, stats=stats,
                     stages=stages_seconds)


READ_AHEAD = 2  # spans fetched ahead of use (range GETs in flight on object storage)
IN_FLIGHT_BYTES = 512 << 20  # bytes held (TensorTask.bytes_held) read but not yet written, across the threads


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def _torch_threads(n: int | None):
    """Torch's intra-op threads set to ``n`` for the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def task_order(job: LayerJob) -> list[TensorTask]:
    """The order a job transcodes its tasks in: that of their outputs in the shard, so the writer hashes as it
    writes instead of reading the shard back (inputs are named alike, safetensors orders by dtype then name, so
    spans are still read in order)."""
    position = {name: i for i, name in enumerate(s.name for s in layout(job.specs))}
    return sorted(job.tasks, key=lambda t: min(position[s.name] for s in t.outputs))


@dataclass(frozen=True)
class WritePass:
    """One front-to-back stretch of a shard: the tasks to transcode, in order, and the outputs they write in it."""

    tasks: tuple[TensorTask, ...]
    outputs: frozenset[str]


def write_passes(job: LayerJob) -> list[WritePass]:
    """The job's tasks in passes that together produce the shard strictly front to back, so it can be streamed
    (an upload sent while the shard is produced, no scratch copy): each pass covers the next stretch of the file,
    and in it every task writes a contiguous run of that stretch. MXFP4 and BF16 shards take one pass. Per-channel
    FP8 takes two: its BF16 scales precede the FP8 weights in the file, so the first pass writes the scales (each
    computed alone, see ``_transcode_batch``) and the other tensors before the weights, and the second transcodes
    the FP8 modules for their weights: their inputs are read twice instead of staging the shard (17 GB for a K2.6
    layer) on local disk."""
    owner = {spec.name: task for task in job.tasks for spec in task.outputs}
    stretches: list[tuple[list[TensorTask], set[str]]] = []
    started: set[int] = set()  # ids of the tasks of the current stretch
    previous = None
    for spec in layout(job.specs):
        task = owner[spec.name]
        if not stretches or (task is not previous and id(task) in started):
            stretches.append(([], set()))  # a task's outputs are not contiguous here: the rest is a later stretch
            started = set()
        tasks, outputs = stretches[-1]
        if task is not previous:
            tasks.append(task)
            started.add(id(task))
        outputs.add(spec.name)
        previous = task
    return [WritePass(tuple(tasks), frozenset(outputs)) for tasks, outputs in stretches]


def run_job(job: LayerJob, source: Storage, out_dir: Path, device: str = "cpu", threads: int = 1,
            fsync: bool = False, sink: Callable[[memoryview], None] | None = None) -> JobResult:
    """Convert one job's tensors into ``out_dir / job.output_file`` on ``threads`` transcode threads (0: every
    core this process may use).

    The stages overlap: spans are read ahead of use on their own threads, tensors are transcoded in parallel
    (each on one torch thread), and one writer thread writes the results in the output file's order while
    another hashes them (so the shard is never read back). At most ``IN_FLIGHT_BYTES`` of input is between read
    and written. The bytes are those of a sequential run: each tensor's result does not depend on the others.
    ``sink``: stream the shard's bytes to it instead of writing the file, in ``write_passes`` (a file is written in
    one pass, each tensor at its offset).
    """
    start = time.perf_counter()
    workers = threads if threads > 0 else available_cores()
    path = Path(out_dir) / job.output_file
    writer = SafetensorsWriter(path, job.specs, metadata={"requant_job": job.name}, sink=sink, hash_thread=True)
    passes = write_passes(job) if sink is not None else [WritePass(tuple(task_order(job)), frozenset(s.name for s in job.specs))]
    transcoders = ThreadPoolExecutor(workers, thread_name_prefix="requant-transcode")
    writing = ThreadPoolExecutor(1, thread_name_prefix="requant-write")
    stats: dict[str, TensorStat] = {}
    reader = None
    try:
        with _torch_threads(1 if workers > 1 else None), stages.measuring() as clock:
            for stretch in passes:
                tasks = list(stretch.tasks)
                reader = CoalescingReader(source, [e for t in tasks for e in t.inputs],
                                          order=[e for t in tasks for e in _read_order(t)], ahead=READ_AHEAD)
                _pipeline(tasks, reader, transcoders, writing, writer, stats, device, workers, stretch.outputs)
                reader.close()
            digest = writer.close(fsync=fsync)
    except BaseException:
        for pool in (transcoders, writing):
            pool.shutdown(wait=True, cancel_futures=True)
        if reader is not None:
            reader.close()
        writer.abort()
        raise
    finally:
        transcoders.shutdown()
        writing.shutdown()
    return JobResult(
        job=job.name,
        output_file=job.output_file,
        sha256=digest,
        size=writer.size,
        bytes_in=job.bytes_in,
        seconds=time.perf_counter() - start,
        host=socket.gethostname(),
        stats=tuple(stats.values()),
        stages=tuple(sorted(clock.seconds.items())),
    )


BATCH_BYTES = 4 << 20  # tasks go through the threads in batches holding at least this much (or one big task)
BATCH_TASKS = 4096


def _batches(tasks: list[TensorTask]):
    """Consecutive tasks grouped so each hand-over between threads carries enough work: a 2048x7168 expert
    alone, thousands of small norms and routers together (208k tiny tensors would otherwise pay a thread
    hand-off each)."""
    batch: list[TensorTask] = []
    nbytes = 0
    for task in tasks:
        batch.append(task)
        nbytes += task.bytes_held
        if nbytes >= BATCH_BYTES or len(batch) >= BATCH_TASKS:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def _pipeline(tasks: list[TensorTask], reader: CoalescingReader, transcoders: ThreadPoolExecutor,
              writing: ThreadPoolExecutor, writer: SafetensorsWriter, stats: dict[str, TensorStat], device: str,
              workers: int, outputs: frozenset[str]) -> None:
    """Read each batch's inputs here (the reader fetches ahead), transcode batches on the pool, hand the results
    to the writer thread in order; only ``outputs`` are written (see ``write_passes``), the first stat of each
    module is kept. A failure anywhere surfaces here, at the latest when its result is collected."""
    transcoding: deque[tuple[list[TensorTask], Future, int]] = deque()
    written: deque[Future] = deque()
    in_flight = 0

    def hand_over() -> None:
        nonlocal in_flight
        batch, future, nbytes = transcoding.popleft()
        with stages.timed("wait_transcode"):
            results = future.result()
        written.append(writing.submit(_write_outputs, writer, batch, [made for made, _ in results], outputs))
        in_flight -= nbytes
        for _, stat in results:
            if stat is not None:
                stats.setdefault(stat.name, stat)
        while len(written) > 2 * workers:  # results waiting for the disk hold memory too
            with stages.timed("wait_write"):
                written.popleft().result()

    for batch, nbytes in _batches(tasks):
        while transcoding and in_flight + nbytes > IN_FLIGHT_BYTES:  # room for it first: its reads allocate
            hand_over()
        with stages.timed("wait_read"):
            inputs = [[reader.read(e) for e in _read_order(task)] for task in batch]
        transcoding.append((batch, transcoders.submit(_transcode_batch, batch, inputs, reader.uri, device, outputs),
                            nbytes))
        in_flight += nbytes
        while transcoding and (transcoding[0][1].done() or len(transcoding) > 2 * workers or in_flight > IN_FLIGHT_BYTES):
            hand_over()
    while transcoding:
        hand_over()
    with stages.timed("wait_write"):
        while written:
            written.popleft().result()


STACK_BYTES = 1 << 20  # INT4 modules below this much input are transcoded stacked with their like (see below)


def _transcode_batch(batch: list[TensorTask], inputs: list[list[torch.Tensor]], uri: str, device: str,
                     outputs: frozenset[str] | None = None):
    """Each task's outputs and stats, in ``batch`` order. A task none of whose outputs but its scale is in
    ``outputs`` (a streamed FP8 shard's first pass) computes the scale alone, where its format can (its output
    list then holds None for the weight, and no stats).

    Small INT4 modules of one shape and target (a toy model's experts: 69k modules of 32x64 in k26-topology) go
    through the kernels stacked along their rows, one call for many: every INT4 conversion is row by row, so the
    bytes are those of one call each, without paying a dozen torch dispatches per module. A real expert (7 MB of
    INT4) fills a batch alone and takes the single-module path."""
    with stages.timed("transcode"):
        return _transcode_each(batch, inputs, uri, device, outputs)


def _transcode_each(batch: list[TensorTask], inputs: list[list[torch.Tensor]], uri: str, device: str,
                    outputs: frozenset[str] | None) -> list:
    results: list = [None] * len(batch)
    groups: dict[tuple, list[int]] = {}
    for i, task in enumerate(batch):
        scale_only = outputs is not None and _scale_only(task, outputs)
        if _stackable(task):
            groups.setdefault((task.target, task.shape, scale_only), []).append(i)
        else:
            results[i] = _transcode_inputs(task, inputs[i], uri, device, scale_only)
    for (_, _, scale_only), members in groups.items():
        if len(members) == 1:
            results[members[0]] = _transcode_inputs(batch[members[0]], inputs[members[0]], uri, device, scale_only)
            continue
        stacked = _transcode_int4_stack([batch[i] for i in members], [inputs[i] for i in members], uri, device,
                                        scale_only)
        for i, result in zip(members, stacked):
            results[i] = result
    return results


def _stackable(task: TensorTask) -> bool:
    """A small INT4 module whose encoding is row by row: not one with a scale over the whole tensor (NVFP4's global
    scale), whose rows stacked with other modules' would share it."""
    fmt = task.format
    return (task.kind == "int4" and task.bytes_in < STACK_BYTES and not task.partners
            and (fmt is None or fmt.global_scale_name is None))


def _scale_only(task: TensorTask, outputs: frozenset[str]) -> bool:
    fmt = task.format
    return (task.kind != "copy" and fmt is not None and fmt.scale_of is not None
            and task.outputs[0].name not in outputs and task.outputs[1].name in outputs)


def _transcode_int4_stack(tasks: list[TensorTask], inputs: list[list[torch.Tensor]], uri: str,
                          device: str, scale_only: bool = False) -> list[tuple[list[torch.Tensor | None], TensorStat | None]]:
    """``_transcode_inputs`` of INT4 tasks of one shape and target, their rows stacked into one matrix."""
    task0 = tasks[0]
    rows, in_features = task0.shape
    for task, task_inputs in zip(tasks, inputs):
        if tuple(task_inputs[0].tolist()) != task.shape:
            _check_int4(task, task_inputs, uri)  # raises, naming the tensor
    scale = torch.cat([scale for _, scale, _ in inputs])
    if not all_finite(scale):
        for task, task_inputs in zip(tasks, inputs):
            _check_int4(task, task_inputs, uri)  # raises for the first module with a NaN/Inf scale
    packed = torch.cat([packed for _, _, packed in inputs]).to(device)
    scale = scale.to(device)
    if scale_only:
        scales = task0.format.scale_from_int4(packed, scale, in_features).cpu().split(rows)
        return [([None, s], None) for s in scales]
    out, stats = _int4_outputs(task0, packed, scale, in_features), None
    if task0.target != UNQUANTIZED:
        sample = _sample_rows(rows, device)
        picked = (torch.arange(len(tasks), device=device) * rows).unsqueeze(1).add(sample).flatten()
        signal, noise = _error_sums(task0, out, picked, lambda r: _int4_decode(task0, packed[r], scale[r], in_features),
                                    int4=(packed, scale))
        signal, noise = signal.view(len(tasks), -1).sum(dim=1).tolist(), noise.view(len(tasks), -1).sum(dim=1).tolist()
        stats = [TensorStat(t.name, t.target, _snr(s, n), len(sample), rows) for t, s, n in zip(tasks, signal, noise)]
    chunks = [t.cpu().split(rows) for t in out]
    return [([chunk[k] for chunk in chunks], stats[k] if stats else None) for k in range(len(tasks))]


def _write_outputs(writer: SafetensorsWriter, batch: list[TensorTask], made: list[list[torch.Tensor]],
                   outputs: frozenset[str]) -> None:
    """Write the batch's results that are among ``outputs``, in the file's order within each task."""
    for task, task_outputs in zip(batch, made):
        for spec, tensor in sorted(zip(task.outputs, task_outputs), key=lambda st: writer.position(st[0].name)):
            if spec.name in outputs:
                writer.write(spec.name, tensor)


def _read_order(task: TensorTask) -> list[TensorEntry]:
    """The order in which a task's inputs are read: INT4 reads its shape first (checked before the rest), the
    other quantized sources their scales; then the inputs of the modules sharing its global scale, if any."""
    if task.kind == "int4":
        packed_e, scale_e, shape_e = task.inputs
        own = [shape_e, scale_e, packed_e]
    elif task.kind in ("fp8_block", "mxfp4"):
        weight_e, scale_e = task.inputs
        own = [scale_e, weight_e]
    else:
        own = list(task.inputs)
    return own + list(task.partners)  # the partners' as stored (MODULE_PARAMS order), after its own


def _transcode_inputs(task: TensorTask, inputs: list[torch.Tensor], uri: str, device: str = "cpu",
                      scale_only: bool = False) -> tuple[list[torch.Tensor | None], TensorStat | None]:
    """One task's output tensors (in ``task.outputs`` order) and, if it quantizes, its error stats, from its
    inputs as read (in ``_read_order``), which are checked first. Jobs run tasks in parallel, so the kernels'
    own row threads stay at 1. ``scale_only``: the weight's scale alone (the weight is None, no stats)."""
    if task.kind == "copy":
        (entry,), (tensor,) = task.inputs, inputs
        _check_finite(tensor, f"{uri}/{entry.file}", entry.name)
        return [tensor], None
    fmt = task.format
    if task.partners:
        inputs, partner_inputs = inputs[:len(task.inputs)], inputs[len(task.inputs):]
        encode = _shared_encoder(task, partner_inputs, device)
    else:
        encode = fmt.encode if fmt is not None else None
    int4 = None  # an INT4 source's (packed, scale), for its error statistics
    if task.kind == "int4":
        packed, scale = _check_int4(task, inputs, uri)
        packed, scale = packed.to(device), scale.to(device)
        in_features = task.shape[1]
        if scale_only:
            return [None, fmt.scale_from_int4(packed, scale, in_features).cpu()], None
        out = _int4_outputs(task, packed, scale, in_features, encode)
        reference = lambda rows: _int4_decode(task, packed[rows], scale[rows], in_features)  # noqa: E731
        int4 = (packed, scale)
    elif task.kind == "mxfp4" and fmt is not None and fmt.from_mxfp4 is not None and not scale_only:
        scale, packed = inputs
        _check_mxfp4(task, scale, uri)
        out = list(fmt.from_mxfp4(packed.to(device), scale.to(device)))  # the same format: repacked, not requantized
        reference = lambda rows: dequantize_mxfp4(packed[rows], scale[rows])  # noqa: E731
    elif task.kind == "fp8_block" and fmt is not None and fmt.from_fp8_block is not None and not scale_only:
        out = _from_fp8_block(task, inputs, uri, device)
        scale, weight = inputs
        reference = lambda rows: dequantize_fp8_block_rows(weight, scale, task.block, rows.cpu())  # noqa: E731
    elif task.kind in ("fp8_block", "mxfp4", *NVFP4_DECODERS):
        weight = decode_source(task, inputs, uri).to(device)
        if fmt is None:
            return [weight.cpu()], None
        if scale_only:
            return [None, fmt.scale_of(weight).cpu()], None
        out = list(encode(weight))
        reference = lambda rows: weight[rows]  # noqa: E731
    else:
        (entry,), (weight,) = task.inputs, inputs
        _check_finite(weight, f"{uri}/{entry.file}", entry.name)
        weight = weight.to(device)
        if scale_only:
            return [None, fmt.scale_of(weight).cpu()], None
        out = list(encode(weight))
        reference = lambda rows: weight[rows]  # noqa: E731
    stat = None if task.target == UNQUANTIZED else _error_stat(task, out, reference, int4)
    return [t.cpu() for t in out], stat


def _check_int4(task: TensorTask, inputs: list[torch.Tensor], uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    packed_e, scale_e, shape_e = task.inputs
    shape, scale, packed = inputs
    if tuple(shape.tolist()) != task.shape:
        raise CheckpointError(f"{uri}/{shape_e.file}", f"weight_shape is {shape.tolist()}, config implies {list(task.shape)}", shape_e.name)
    _check_finite(scale, f"{uri}/{scale_e.file}", scale_e.name)
    return packed, scale


def decode_source(task: TensorTask, inputs: list[torch.Tensor], uri: str) -> torch.Tensor:
    """The BF16 weight of a module stored as FP8 blocks, MXFP4 or NVFP4 upstream, from its inputs as read (scale
    first; NVFP4 as stored), checked first: what Quark's file-to-file export quantizes from the same weights decoded
    to BF16."""
    weight_e = task.inputs[0]
    if task.kind in NVFP4_DECODERS:
        return _decode_nvfp4(task, inputs, uri)
    scale, weight = inputs
    if task.kind == "mxfp4":
        _check_mxfp4(task, scale, uri)
        decoded = dequantize_mxfp4(weight, scale, torch.bfloat16)  # exact where finite: MXFP4 values are BF16 values
        if not all_finite(decoded):  # e.g. code 6 under E8M0 2**126
            bad = int((~torch.isfinite(decoded)).sum())
            raise CheckpointError(f"{uri}/{weight_e.file}", f"{bad} values decode beyond BF16's range (Inf)",
                                  weight_e.name)
        return decoded
    _check_fp8_scales(task, scale, uri)
    try:
        return dequantize_fp8_block_checked(weight, scale, task.block)
    except ValueError as e:  # NaN codes, or values beyond BF16's range (448 under a huge block scale)
        raise CheckpointError(f"{uri}/{weight_e.file}", str(e), weight_e.name) from None


def _decode_nvfp4(task: TensorTask, inputs: list[torch.Tensor], uri: str) -> torch.Tensor:
    """compressed-tensors' NVFP4 (a global scale that divides) or Model Optimizer's (a weight_scale_2 that
    multiplies), checked first."""
    packed, scale, global_scale = inputs
    packed_e, scale_e, global_e = task.inputs
    if bad := int((scale.view(torch.uint8) & 0x7F).eq(FP8_E4M3_NAN_BITS).sum()):
        raise CheckpointError(f"{uri}/{scale_e.file}", f"{bad} FP8 scales are NaN", scale_e.name)
    if not (all_finite(global_scale) and bool((global_scale > 0).all())):
        raise CheckpointError(f"{uri}/{global_e.file}", f"global scale {global_scale.tolist()} is not a positive "
                              "finite number", global_e.name)
    decoded = NVFP4_DECODERS[task.kind](packed, scale, global_scale, torch.bfloat16)
    if not all_finite(decoded):
        bad = int((~torch.isfinite(decoded)).sum())
        raise CheckpointError(f"{uri}/{packed_e.file}", f"{bad} values decode beyond BF16's range (Inf)", packed_e.name)
    return decoded


def _check_fp8_scales(task: TensorTask, scale: torch.Tensor, uri: str) -> None:
    scale_e = task.inputs[1]
    _check_finite(scale, f"{uri}/{scale_e.file}", scale_e.name)
    if task.pow2_scales and (bad := non_power_of_two(scale)):
        raise CheckpointError(f"{uri}/{scale_e.file}", f"{bad} scales are not powers of two, but config.json "
                              "declares scale_fmt ue8m0", scale_e.name)


def _from_fp8_block(task: TensorTask, inputs: list[torch.Tensor], uri: str, device: str) -> list[torch.Tensor]:
    """A target's tensors straight from FP8 blocks (the format's fused path), the inputs checked as
    :func:`decode_source` checks them."""
    scale, weight = inputs
    _check_fp8_scales(task, scale, uri)
    try:
        return list(task.format.from_fp8_block(weight.to(device), scale.to(device), task.block))
    except ValueError as e:  # NaN codes, or values beyond BF16's range
        raise CheckpointError(f"{uri}/{task.inputs[0].file}", str(e), task.inputs[0].name) from None


def _check_mxfp4(task: TensorTask, scale: torch.Tensor, uri: str) -> None:
    if bad := int(scale.eq(E8M0_NAN).sum()):
        scale_e = task.inputs[1]
        raise CheckpointError(f"{uri}/{scale_e.file}", f"{bad} E8M0 scales are 0xFF (NaN)", scale_e.name)


def _check_finite(tensor: torch.Tensor, file: str, name: str) -> None:
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(file, f"{bad} NaN/Inf values", name)


def _int4_outputs(task: TensorTask, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                  encode: Callable | None = None) -> list[torch.Tensor]:
    """The output tensors of INT4 rows converted to the task's target (the fused kernel where the format has one;
    ``encode``: the format's encoder, with the global scale shared with partners bound where there are any).
    Left unquantized, every Quark release stores compressed-tensors' BF16 decode."""
    fmt = task.format
    if fmt is None:
        return [dequantize_int4(packed, scale, in_features)]
    if fmt.from_int4 is not None and not task.partners:
        return list(fmt.from_int4(packed, scale, in_features))
    if fmt.from_int4 is not None and isinstance(encode, _SharedEncoder):  # the fused path, given the set's amax
        return list(fmt.from_int4(packed, scale, in_features, amax=encode.amax(int4_amax(packed, scale, in_features))))
    return list((encode or fmt.encode)(_int4_decode(task, packed, scale, in_features)))


@dataclass(frozen=True)
class _SharedEncoder:
    """A task's encoder with the largest magnitude of the partners sharing its global scale bound."""

    task: TensorTask
    partner_amax: tuple[torch.Tensor, ...]

    def amax(self, own: torch.Tensor) -> torch.Tensor:
        """The largest magnitude over the task's weight (``own``, its amax) and its partners', in ``own``'s dtype."""
        return torch.stack([own, *(a.to(own.dtype) for a in self.partner_amax)]).amax()

    def __call__(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.task.format.encode_shared(weight, self.amax(tensor_amax(weight)))


def _shared_encoder(task: TensorTask, partner_inputs: list[torch.Tensor], device: str) -> _SharedEncoder:
    """The task's encoder with the largest magnitude over it and the partners sharing its global scale bound: the
    partners' inputs (``TensorTask.partners``, as stored) are decoded as their own tasks decode them (each partner's
    task checks them); INT4 partners of a BF16 decode are not decoded (:func:`int4_amax` reads their groups)."""
    per_module = len(task.inputs)
    partner_amax = []
    for k in range(0, len(partner_inputs), per_module):
        tensors = partner_inputs[k:k + per_module]
        if task.kind == "int4" and INT4_DECODE_DTYPE[task.table] is None:
            packed, scale, _ = tensors
            partner_amax.append(int4_amax(packed.to(device), scale.to(device), task.shape[1]))
            continue
        if task.kind == "int4":
            packed, scale, _ = tensors
            weight = _int4_decode(task, packed.to(device), scale.to(device), task.shape[1])
        elif task.kind == "mxfp4":
            packed, scale = tensors
            weight = dequantize_mxfp4(packed.to(device), scale.to(device), torch.bfloat16)
        elif task.kind == "fp8_block":
            weight = dequantize_fp8_block_checked(tensors[0].to(device), tensors[1].to(device), task.block)
        elif task.kind in NVFP4_DECODERS:
            weight = NVFP4_DECODERS[task.kind](*(t.to(device) for t in tensors), torch.bfloat16)
        else:
            (weight,) = tensors
        partner_amax.append(tensor_amax(weight.to(device)))
    return _SharedEncoder(task, tuple(partner_amax))


def _int4_decode(task: TensorTask, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """The INT4 decode the task's format table quantizes (BF16 for Quark 0.11 and compressed-tensors, the exact FP32
    for Quark 0.13)."""
    return dequantize_int4(packed, scale, in_features, dtype=INT4_DECODE_DTYPE[task.table])


def _sample_rows(rows: int, device) -> torch.Tensor:
    """The rows of a module its error statistics use: ``SNR_SAMPLE_ROWS``, evenly spaced, deterministic."""
    return torch.arange(0, rows, max(1, rows // SNR_SAMPLE_ROWS), device=device)[:SNR_SAMPLE_ROWS]


def _error_sums(task: TensorTask, out: list[torch.Tensor], rows: torch.Tensor, reference,
                int4: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``rows``: the squared high-precision weights and the squared error of their encoding (FP64).
    ``int4``: the INT4 source's (packed, scale), whose MXFP4 encoding on a CPU is measured by the compiled kernel in
    one pass (the same sums as the decodes below, bit for bit)."""
    with stages.timed("snr"):
        if int4 is not None and task.format.name == "mxfp4" and out[0].device.type == "cpu":
            exact = INT4_DECODE_DTYPE[task.table] == torch.float32
            return int4_mxfp4_error_sums(*int4, out[0], out[1], rows, exact)
        ref = reference(rows).to(torch.float64)
        sampled, scales = (t.view(torch.uint8)[rows].view(t.dtype) if t.element_size() == 1 else t[rows]
                           for t in out[:2])  # one-byte types as bytes: CPU indexing has no FP8 kernel
        got = task.format.decode(sampled, scales, *out[2:]).to(torch.float64)
        return ref.square().sum(dim=1), (ref - got).square_().sum(dim=1)


def _snr(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))


def _error_stat(task: TensorTask, out: list[torch.Tensor], reference, int4=None) -> TensorStat:
    rows = task.shape[0]
    sample = _sample_rows(rows, out[0].device)
    signal, noise = _error_sums(task, out, sample, reference, int4)
    return TensorStat(task.name, task.target, _snr(float(signal.sum()), float(noise.sum())), len(sample), rows)
