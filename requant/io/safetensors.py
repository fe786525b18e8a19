"""safetensors without unpickling and without reading whole shards.

Reading: parse and fully validate the JSON header (bounds, sizes, overlaps, dtypes) from the first
bytes of a shard, then fetch single tensors by byte range. Writing: a streaming writer that puts the
header first (all shapes are known from the plan) and then one tensor at a time, hashing as it goes,
so a job never holds more than one tensor in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from requant import stages
from requant.errors import CheckpointError, os_failure

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F64": (torch.float64, 8),
}
TORCH_TO_NAME = {t: name for name, (t, _) in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (MAX_HEADER_SIZE in safetensors/src/tensor.rs)
MAX_JSON_DEPTH = 127  # serde_json's recursion limit: the library refuses a header nested deeper
# torch sizes, strides and storage offsets are int64: a shape whose dims (zeros counted as 1) span more bytes
# cannot become a tensor even when it is empty (the library refuses most such shapes, torch the rest)
MAX_SHAPE_BYTES = 2 ** 63 - 1
HEADER_PREFIX = 8


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard: where its bytes are (absolute file offsets) and what they mean."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def frozen_builder(cls: type):
    """A function making a frozen dataclass instance from a tuple of its fields, in their order, without running
    ``__init__`` (which sets each field through ``object.__setattr__``, several times slower): for values already
    checked, built 10^5 at a time (shard headers, plans arriving at a worker)."""
    fields = tuple(cls.__dataclass_fields__)
    new = object.__new__

    def build(row: tuple):
        obj = new(cls)
        obj.__dict__.update(zip(fields, row))
        return obj
    return build


def header_length(prefix: bytes, file: str, file_size: int) -> int:
    if file_size < HEADER_PREFIX or len(prefix) < HEADER_PREFIX:
        raise CheckpointError(file, f"truncated: {file_size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:HEADER_PREFIX])
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(file, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if HEADER_PREFIX + n > file_size:
        raise CheckpointError(file, f"header length {n} runs past the end of the file ({file_size} bytes)")
    return n


def parse_header(header: bytes, file: str, file_size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate a safetensors header and return its tensors (absolute offsets) and metadata."""
    try:
        raw = _load_json(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, _StrictJSON
        raise CheckpointError(file, f"header is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(file, "header is not a JSON object")
    metadata = raw.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # JSON null: no metadata, as the library reads it
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(file, "__metadata__ must map strings to strings")
    base = HEADER_PREFIX + len(header)
    data_len = file_size - base
    entries: dict[str, TensorEntry] = {}
    for name, info in raw.items():
        entries[name] = _entry(name, info, file, base, data_len)
    spans = sorted(entries.values(), key=_span)
    cursor = base
    for prev, entry in zip([None, *spans[:-1]], spans):
        if entry.start < cursor:
            raise CheckpointError(file, f"bytes {entry.start}..{entry.end} overlap tensor {prev.name}", entry.name)
        if entry.start > cursor:
            raise CheckpointError(file, f"gap of {entry.start - cursor} bytes before this tensor", entry.name)
        cursor = entry.end
    if cursor != file_size:
        raise CheckpointError(file, f"tensor data ends at byte {cursor} but the file has {file_size} bytes")
    return entries, metadata


_span = operator.attrgetter("start", "end")
# serde_json (the safetensors library's parser) reads -0 and integers outside i64/u64 as floats (and refuses
# those beyond a float's range). Only a header holding "-0" or a run of 20 digits somewhere (in a number, or in a
# name like "a-0") pays for a Python call per integer to find them.
_INT_RANGE = range(-2 ** 63, 2 ** 64)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_U64 = 2 ** 64
_ENTRY_KEYS = 3  # dtype, shape, data_offsets


def _load_json(header: bytes) -> object:
    """The header's JSON as the safetensors library would accept it: duplicate keys, NaN/Infinity, out-of-range
    numbers, nesting deeper than serde_json allows and lone surrogate escapes are refused (``ValueError``)."""
    text = header.decode("utf-8")
    strict = {"parse_constant": _no_constant, "parse_float": _finite_float,
              "parse_int": _json_int if _odd_integers(header) else None}
    raw = json.loads(text, **strict)
    if not _surely_unique_keys(text, raw):
        raw = json.loads(text, object_pairs_hook=_unique_keys, **strict)  # a Python call per object: finds the key
    if b"\\u" in header or not isinstance(raw, dict):
        _check_json_tree(raw)
    else:
        # Lone surrogates come only from \u escapes. Deep nesting can only hide in an entry with keys beyond the
        # three it needs: in those three, anything but a string or a list of integers is refused by _entry.
        _check_json_tree([v for v in raw.values() if type(v) is not dict or len(v) > _ENTRY_KEYS])
    return raw


def _odd_integers(header: bytes) -> bool:
    return b"-0" in header or b"0" * 20 in header.translate(_DIGITS_AS_ZERO)


def _surely_unique_keys(text: str, raw: object) -> bool:
    """True when ``text``, parsed into ``raw``, cannot have held a key twice, decided without a Python call per
    object. Applies when every object of ``text`` is ``raw`` or one of its values (a safetensors header: one
    object per tensor): then the braces in ``text`` are those objects' plus any inside strings, and its colons
    their keys (duplicates included) plus any inside strings. Both counts equal to what was parsed leaves
    no room for a duplicate."""
    if type(raw) is not dict:
        return False
    objects = [v for v in raw.values() if type(v) is dict]
    return (text.count("{") == 1 + len(objects)
            and text.count(":") == len(raw) + sum(map(len, objects)))


class _StrictJSON(ValueError):
    """JSON that Python's json module accepts but serde_json (the safetensors library's parser) refuses."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # json keeps the last silently; other readers may keep the first
        keys = [k for k, _ in pairs]
        raise _StrictJSON(f"duplicate key {next(k for k in keys if keys.count(k) > 1)[:40]!r}")
    return obj


def _no_constant(name: str) -> None:
    raise _StrictJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _StrictJSON(f"number {text[:40]} is out of range")
    return value


def _json_int(text: str) -> int | float:
    """serde_json reads -0 and integers outside i64/u64 as floats: they are then not valid shapes or offsets."""
    value = int(text)
    return _finite_float(text) if text == "-0" or value not in _INT_RANGE else value


def _check_json_tree(raw: object) -> None:
    """No nesting deeper than serde_json allows, no lone surrogate escapes (serde_json refuses both)."""
    level, depth = [raw], 0
    while level := [n for n in level if isinstance(n, (dict, list))]:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise _StrictJSON(f"nested deeper than {MAX_JSON_DEPTH} levels")
        items = [x for n in level for x in (n.items() if isinstance(n, dict) else n)]
        level = [v for x in items for v in (x if isinstance(x, tuple) else (x,))]
        for s in level:
            if isinstance(s, str) and not s.isascii():
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise _StrictJSON(f"string {s[:40]!r} holds a lone surrogate escape") from exc


def _ints_in(values: list, low: int, high: int) -> bool:
    """Every element an int (not a bool, not a float) in [low, high): checked in C, not a Python call per element
    (a K2.6 plan reads ~10^5 headers entries)."""
    return not values or (set(map(type, values)) == _INT_TYPE and low <= min(values) and max(values) < high)


_INT_TYPE = {int}


def _entry(name: str, info: object, file: str, base: int, data_len: int) -> TensorEntry:
    if type(info) is not dict:
        raise CheckpointError(file, "header entry is not an object", name)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if type(dtype) is not str or dtype not in DTYPES:
        raise CheckpointError(file, f"unknown dtype {str(dtype)[:40]!r}", name)
    if type(shape) is not list or not _ints_in(shape, 0, _U64):
        raise CheckpointError(file, f"shape {shape!r} is not a list of non-negative integers", name)
    expected = math.prod(shape) * DTYPES[dtype][1]
    if (math.prod(d or 1 for d in shape) * DTYPES[dtype][1] if 0 in shape else expected) > MAX_SHAPE_BYTES:
        raise CheckpointError(file, f"shape {shape!r} overflows torch's 64-bit sizes", name)
    if not (type(offsets) is list and len(offsets) == 2 and _ints_in(offsets, _INT_RANGE.start, _INT_RANGE.stop)):
        raise CheckpointError(file, f"data_offsets {offsets!r} is not a pair of integers", name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(file, f"data_offsets {offsets} are not ordered", name)
    if end > data_len:
        raise CheckpointError(file, f"data_offsets {offsets} run past the end of the data ({data_len} bytes); truncated shard?", name)
    if end - begin != expected:
        raise CheckpointError(file, f"{dtype}{shape} needs {expected} bytes but data_offsets span {end - begin}", name)
    return _new_entry((name, file, dtype, tuple(shape), base + begin, base + end))


_new_entry = frozen_builder(TensorEntry)


def fetch_header(storage, file: str) -> tuple[bytes, int]:
    """One shard's header bytes (checked for length only) and the shard's size: two small range reads."""
    size = storage.size(file)
    n = header_length(storage.read_range(file, 0, min(HEADER_PREFIX, size)), file, size)
    return storage.read_range(file, HEADER_PREFIX, HEADER_PREFIX + n), size


HEADER_READERS = 8  # shard headers fetched at once: on object storage each costs three round trips


def read_headers(storage, files: list[str]) -> Iterator[tuple[str, tuple[dict[str, TensorEntry], int] | CheckpointError]]:
    """Each file's validated header (its tensors) and size, in ``files`` order, or the CheckpointError that names
    what is wrong with it; fetched ``HEADER_READERS`` at a time, parsed here."""
    def fetch(file: str) -> tuple[bytes, int] | CheckpointError:
        try:
            return fetch_header(storage, file)
        except CheckpointError as exc:
            return exc

    with ThreadPoolExecutor(HEADER_READERS, thread_name_prefix="requant-headers") as pool:
        for file, got in zip(files, pool.map(fetch, files)):
            if not isinstance(got, CheckpointError):
                try:
                    got = parse_header(got[0], file, got[1])[0], got[1]
                except CheckpointError as exc:
                    got = exc
            yield file, got


def read_header(storage, file: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read and validate one shard's header."""
    header, size = fetch_header(storage, file)
    return parse_header(header, file, size)


def bytes_to_tensor(data: bytes | bytearray, entry: TensorEntry) -> torch.Tensor:
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=entry.torch_dtype).reshape(entry.shape)


def read_tensor(storage, entry: TensorEntry) -> torch.Tensor:
    """Fetch exactly one tensor's bytes."""
    return bytes_to_tensor(storage.read_range(entry.file, entry.start, entry.end), entry)


@dataclass(frozen=True)
class TensorSpec:
    """What a writer will put in a file, known before the data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape) * DTYPES[dtype][1]


# The safetensors library's file order: by its Dtype enum, last variant first, then by name. Wider types come
# first, so every tensor stays aligned to its element size without padding; files come out byte for byte as
# the library's save_file writes them.
_DTYPE_RANK = {name: i for i, name in enumerate(
    ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}


def layout(specs: list[TensorSpec]) -> list[TensorSpec]:
    """Order tensors as the safetensors library does (see _DTYPE_RANK)."""
    return sorted(specs, key=lambda s: (_DTYPE_RANK[s.dtype], s.name))


def file_head(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, list[tuple[TensorSpec, int]]]:
    """The first bytes of a safetensors file holding ``specs`` (the header's length, the header padded to 8 bytes)
    and each tensor's data offset, in file order (:func:`layout`)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offsets = []
    offset = 0
    for spec in layout(specs):
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offsets.append((spec, offset))
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offsets


class OrderedDigest:
    """A SHA-256 fed in order, on a thread of its own where asked (``threaded``): its caller then writes a tensor
    while the previous ones are hashed (hashlib releases the GIL), so writing a shard costs the slower of the two,
    not their sum. At most ``PENDING`` updates wait; each holds its bytes until it is hashed."""

    PENDING = 4

    def __init__(self, head: bytes, threaded: bool = False):
        self._sha = hashlib.sha256(head)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="requant-hash-out") if threaded else None
        self._pending: deque[Future] = deque()

    def update(self, data: memoryview) -> None:
        if self._pool is None:
            self._hash(data)
            return
        while len(self._pending) >= self.PENDING:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._hash, data))

    def _hash(self, data: memoryview) -> None:
        with stages.timed("hash_out"):
            self._sha.update(data)

    def hexdigest(self) -> str:
        """The digest of everything updated so far (waits for the updates in flight)."""
        while self._pending:
            self._pending.popleft().result()
        return self._sha.hexdigest()

    def close(self) -> None:
        """Stop hashing (an update in flight finishes; waiting ones are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class SafetensorsWriter:
    """Writes a safetensors file whose layout is fixed up front (all shapes come from the plan).

    Tensors may arrive in any order: each is written at its own offset, so a job holds one tensor at
    a time. ``close`` checks every declared tensor arrived and returns the file's sha256. The digest is
    computed while writing for as long as tensors arrive in the file's own order (``order()``); ``close``
    reads back only the part after the first tensor that arrived out of order.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None,
                 sink: Callable[[memoryview], None] | None = None, hash_thread: bool = False):
        """``sink``: stream the file instead of writing ``path`` (which then only names it in errors): every byte
        goes to ``sink`` in file order, so tensors must arrive in ``order()``. ``hash_thread``: hash on a thread
        of its own, beside the writes (:class:`OrderedDigest`)."""
        self.path = Path(path)
        self._sink = sink
        head, offsets = file_head(specs, metadata)
        self._offsets = {spec.name: (offset, spec) for spec, offset in offsets}
        self._base = len(head)
        self.size = self._base + sum(spec.nbytes for spec in specs)
        self._written: set[str] = set()
        self._order = [spec.name for spec in layout(specs)]
        self._digest = OrderedDigest(head, threaded=hash_thread)
        self._hashed = 0  # tensors of self._order already in self._digest
        self._file = None
        if sink is not None:
            sink(memoryview(head))
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
        except OSError as exc:
            self._digest.close()
            raise os_failure(self.path, exc, "creating the output shard") from exc
        try:
            self._file.write(head)
            self._file.truncate(self.size)
        except OSError as exc:
            self.abort()
            raise os_failure(self.path, exc, "writing the output shard") from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._offsets or name in self._written:
            raise RuntimeError(f"{self.path}: tensor {name} was not declared or is written twice")
        offset, spec = self._offsets[name]
        if TORCH_TO_NAME.get(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{self.path}: {name} is {tensor.dtype}{tuple(tensor.shape)}, declared {spec.dtype}{spec.shape}")
        in_order = self._hashed < len(self._order) and self._order[self._hashed] == name
        if self._sink is not None and not in_order:
            raise RuntimeError(f"{self.path}: streamed tensors must arrive in file order; {name} came early")
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            view = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            if in_order:
                self._digest.update(view)
            with stages.timed("write"):
                if self._sink is not None:
                    self._sink(view)
                else:
                    try:
                        self._file.seek(self._base + offset)
                        self._file.write(view)
                    except OSError as exc:
                        raise os_failure(self.path, exc, f"writing tensor {name}") from exc
        if self._hashed < len(self._order) and self._order[self._hashed] == name:
            self._hashed += 1
        self._written.add(name)

    def position(self, name: str) -> int:
        """Where tensor ``name`` sits in the file (its data offset)."""
        return self._offsets[name][0]

    def order(self) -> list[str]:
        """Tensor names in file order: writing in this order lets ``close`` skip reading the file back."""
        return list(self._order)

    def close(self, fsync: bool = False) -> str:
        """Finish the file and return its sha256; raises (and deletes the file) if a tensor is missing.
        ``fsync``: on stable storage before returning (a resumable run records the shard as done next)."""
        try:
            return self._close(fsync)
        finally:
            self._digest.close()

    def _close(self, fsync: bool) -> str:
        if self._file is not None:
            try:
                with stages.timed("write"):
                    self._file.flush()
                    if fsync:
                        os.fsync(self._file.fileno())
                    self._file.close()
            except OSError as exc:
                raise os_failure(self.path, exc, "finishing the output shard") from exc
        missing = sorted(set(self._offsets) - self._written)
        if missing:
            if self._file is not None:
                self.path.unlink(missing_ok=True)
            raise RuntimeError(f"{self.path}: {len(missing)} declared tensors were never written, e.g. {missing[0]}")
        if self._hashed < len(self._order):  # read back what arrived after the first out-of-order tensor
            start = self._base + self._offsets[self._order[self._hashed]][0]
            with open(self.path, "rb") as f:
                f.seek(start)
                while block := f.read(8 << 20):
                    self._digest.update(memoryview(block))
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Close and delete the partial file. Never raises: it runs while another error is on its way out
        (closing flushes buffered bytes, which fails again on a full disk), and must not replace it."""
        self._digest.close()
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError:
            pass
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
