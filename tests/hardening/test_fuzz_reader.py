"""Fuzzing the checkpoint reader: mutated safetensors headers, index files and configs end in a clear
requant error or a correct result; never another exception, a hang, an allocation sized by a header field,
or a read outside the file.

The safetensors library (its Rust reader, through ``safe_open``) is the oracle for every fuzzed shard: a file
our reader accepts must load there too, with the same tensor names, dtypes, shapes, bytes and metadata. Where
our reader refuses a file the library reads, the reason must be one of the deliberate ones in ``STRICTER``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import psutil
import pytest
import torch
from hardening_support import scale
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from requant.errors import CheckpointError, RequantError
from requant.io.safetensors import DTYPES, MAX_HEADER_BYTES, header_length, read_header, read_tensor
from requant.io.storage import LocalDir
from requant.planning import build_plan
from requant.recipe import load_recipe

BASE = save({"a.weight": torch.arange(32, dtype=torch.bfloat16).reshape(4, 8),
             "a.weight_packed": torch.arange(4, dtype=torch.int32).reshape(4, 1),
             "b": torch.arange(4, dtype=torch.uint8).reshape(2, 2)})
HEADER_LEN = struct.unpack("<Q", BASE[:8])[0]
HEADER = json.loads(BASE[8:8 + HEADER_LEN])
DATA = BASE[8 + HEADER_LEN:]
SETTINGS = dict(deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=False)
# Files the library reads that requant refuses on purpose (substring of our error -> why that is fine).
STRICTER = {
    "unknown dtype": "a dtype requant never reads (sub-byte and E8M0 tensors, complex); refusing it is the point",
    "duplicate key": "JSON readers disagree on which duplicate wins (the library keeps the last tensor entry); "
                     "a header with two meanings is refused",
    "overflows torch's 64-bit sizes": "an empty tensor whose dims, zeros counted as 1, exceed int64: torch.empty "
                                      "cannot build it, so neither can the reader",
}
SERDE_DEPTH = 127  # serde_json's recursion limit, the deepest header nesting the library reads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)

# JSON text (not values): where Python's json and serde_json, the library's parser, part ways.
TRICKY_SCALARS = ["-0", "0", "1", "-1", "1.0", "1e0", "1E400", "-1e999", "1e-999", "NaN", "Infinity", "-Infinity",
                  str(2 ** 63), str(2 ** 64 - 1), str(2 ** 64), "9" * 400, "7" * 5000, '"\\ud800"', '"x\\udfff"',
                  '"\\ud83d\\ude00"', '"\\u0000"', '"BF16"', '"U8"', "true", "false", "null", '""', "[]", "{}"]
KEYS = ['"k"', '"dtype"', '"shape"', '"data_offsets"', '"__metadata__"', '"b"', '"\\ud800"', '"\\ud83d\\ude00"']
DTYPE_NAMES = sorted(DTYPES) + ["F8_E8M0", "F4", "F6_E2M3", "C64", "bf16", ""]
json_text = st.recursive(
    st.sampled_from(TRICKY_SCALARS) | st.integers(-2 ** 70, 2 ** 70).map(str) | st.text(max_size=6).map(json.dumps),
    lambda children: st.lists(children, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
    | st.lists(st.tuples(st.sampled_from(KEYS), children), max_size=4).map(
        lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"),
    max_leaves=12) | st.sampled_from([SERDE_DEPTH - 3, SERDE_DEPTH - 2, SERDE_DEPTH - 1, 3000]).map(
    lambda d: "[" * d + "]" * d)
dims = st.integers(0, 4) | st.sampled_from([2 ** 31, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64])
WHITESPACE = ["", " ", "\n", "\t", "\r\n", "\x0c", "\u00a0", "\ufeff"]


def _shard(header: str | bytes, data: bytes = DATA) -> bytes:
    raw = header.encode("utf-8", "surrogatepass") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def valid_shard(draw) -> bytes:
    """A well-formed file unlike BASE: other dtypes, scalars and empty tensors, any names, metadata, data order
    and JSON formatting. Both readers must accept it and agree on every byte."""
    names = draw(st.lists(st.text(max_size=12).filter(lambda n: n != "__metadata__"), max_size=5, unique=True))
    specs = [(n, draw(st.sampled_from(sorted(DTYPES))), draw(st.lists(st.integers(0, 3), max_size=3))) for n in names]
    order = draw(st.permutations(range(len(specs))))
    header: dict[str, object] = {}
    offset = 0
    for i in order:
        name, dtype, shape = specs[i]
        size = math.prod(shape) * DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    metadata = draw(st.sampled_from(["absent", "null", "map"]))
    if metadata != "absent":
        header["__metadata__"] = None if metadata == "null" else draw(
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    items = list(header.items())
    draw(st.randoms()).shuffle(items)
    text = json.dumps(dict(items), ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1])))
    text = draw(st.sampled_from(WHITESPACE[:5])) + text + " " * draw(st.integers(0, 7))
    return _shard(text, draw(st.binary(min_size=offset, max_size=offset)))


@st.composite
def spliced_shard(draw) -> bytes:
    """BASE's header with one piece of awkward JSON text spliced in: an extra entry field, __metadata__, a
    top-level key, an empty tensor with extreme dims, a rewritten number, odd whitespace around the object."""
    parts = [f"{json.dumps(name)}:{json.dumps(info, separators=(',', ':'))}" for name, info in HEADER.items()]
    where = draw(st.sampled_from(["entry field", "metadata", "metadata entry", "top-level", "empty tensor",
                                  "number", "whitespace"]))
    i = draw(st.integers(0, len(parts) - 1))
    if where == "entry field":
        parts[i] = parts[i][:-1] + f",{draw(st.sampled_from(KEYS))}:{draw(json_text)}}}"
    elif where == "metadata":
        parts.insert(i, f'"__metadata__":{draw(json_text)}')
    elif where == "metadata entry":
        parts.insert(i, '"__metadata__":{' + ",".join(f"{k}:{v}" for k, v in draw(
            st.lists(st.tuples(st.sampled_from(KEYS), json_text), max_size=3))) + "}")
    elif where == "top-level":
        parts.insert(i, f"{draw(st.sampled_from(KEYS))}:{draw(json_text)}")
    elif where == "empty tensor":
        at = draw(st.sampled_from([0, 16, 80, 84]))
        shape = draw(st.lists(dims, max_size=4).map(lambda ds: [*ds, 0]).flatmap(st.permutations))
        parts.insert(i, f'{draw(st.sampled_from(KEYS))}:{{"dtype":"{draw(st.sampled_from(DTYPE_NAMES))}",'
                        f'"shape":{json.dumps(shape)},"data_offsets":[{at},{at}]}}')
    elif where == "number":
        numbers = list(re.finditer(r"\d+", parts[i]))
        m = draw(st.sampled_from(numbers))
        n = int(m.group())
        new = draw(st.sampled_from([f"-{n}", f"{n}.0", f"{n}e0", f"+{n}", f"0{n}", f" {n} ", str(n + 2 ** 64),
                                    str(n - 2 ** 64), "-0" if n == 0 else str(n)]))
        parts[i] = parts[i][:m.start()] + new + parts[i][m.end():]
    text = "{" + ",".join(parts) + "}"
    if where == "whitespace":
        text = draw(st.sampled_from(WHITESPACE)) + text + draw(st.sampled_from(WHITESPACE))
    return _shard(text)


@st.composite
def mutated_shard(draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "length", "entry", "extra", "metadata", "valid", "splice"]))
    if kind == "valid":
        return draw(valid_shard())
    if kind == "splice":
        return draw(spliced_shard())
    if kind == "flip":
        data = bytearray(BASE)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, 8 + HEADER_LEN - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return BASE[:draw(st.integers(0, len(BASE) - 1))]
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2 ** 64 - 1))) + BASE[8:]
    header = json.loads(json.dumps(HEADER))
    if kind == "entry":
        name = draw(st.sampled_from(["a.weight", "a.weight_packed", "b"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(json_values | st.sampled_from(["BF16", "F8_E4M3", "I64", "U8", "F64"])
                                   | st.lists(st.integers(-2 ** 63, 2 ** 64), max_size=4))
    elif kind == "extra":
        header[draw(st.text(max_size=30))] = draw(json_values)
    else:
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + BASE[8 + HEADER_LEN:]


class BoundedReads(LocalDir):
    """Fails the test if the reader ever asks for bytes outside the file."""

    def read_range(self, path: str, start: int, end: int) -> bytes:
        size = self.size(path)
        assert 0 <= start <= end <= size, f"read {start}..{end} outside a {size}-byte file"
        return super().read_range(path, start, end)


def library_read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | str:
    """The safetensors library's own reading of a file: (tensors, metadata), or why it refused it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except Exception as exc:  # SafetensorError, or torch refusing the shape (TypeError, RuntimeError)
        return f"{type(exc).__name__}: {exc}"


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def compare_with_library(path: Path, ours: tuple[dict, dict, dict] | RequantError) -> str:
    """The oracle's verdict on one file our reader accepted (``ours`` = entries, tensors, metadata) or refused."""
    theirs = library_read(path)
    if isinstance(ours, RequantError):
        if isinstance(theirs, str):
            return "both refuse"
        reason = next((k for k in STRICTER if k in str(ours)), None)
        assert reason, f"we refuse a file the safetensors library reads, for no deliberate reason: {ours}"
        return f"stricter: {reason}"
    assert not isinstance(theirs, str), f"we accepted a file the safetensors library refuses ({theirs})"
    entries, tensors, metadata = ours
    lib_tensors, lib_metadata = theirs
    assert sorted(lib_tensors) == sorted(entries), "tensor names differ from the library's"
    for name, entry in entries.items():
        mine, lib = tensors[name], lib_tensors[name]
        expected = (entry.torch_dtype, entry.shape)
        assert (mine.dtype, tuple(mine.shape)) == (lib.dtype, tuple(lib.shape)) == expected, name
        assert raw_bytes(mine) == raw_bytes(lib), f"{name}: bytes differ from the library's"
    assert metadata == lib_metadata, "metadata differs from the library's"
    return "equal to safetensors"


@settings(max_examples=scale(400, 4000), **SETTINGS)
@given(data=mutated_shard())
def test_mutated_safetensors_headers(tmp_path_factory, ledger, data):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "model.safetensors").write_bytes(data)
    storage = BoundedReads(root)
    tracemalloc.start()
    try:
        entries, metadata = read_header(storage, "model.safetensors")
        tensors = {}
        for name, entry in entries.items():
            tensor = read_tensor(storage, entry)
            assert tensor.numel() * tensor.element_size() == entry.nbytes
            tensors[name] = tensor
        ours = (entries, tensors, metadata)
        outcome = "parsed (valid)"
    except RequantError as exc:
        message = str(exc)
        assert "\n" not in message and "model.safetensors" in message
        ours = exc
        outcome = "clear error"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 * len(data) + (1 << 20), f"allocated {peak} bytes for a {len(data)}-byte file"
    ledger.record("safetensors header fuzz", outcome)
    verdict = compare_with_library(root / "model.safetensors", ours)
    ledger.record("safetensors header fuzz: safetensors library", verdict)


# Each case was found where Python's json and the library's reader disagree; before the reader refused them,
# requant accepted every "both refuse" case here (or raised something other than a clear error).
ENTRY_B = '{"dtype":"U8","shape":[2,2],"data_offsets":[80,84]}'
HEAD = '"a.weight_packed":{"dtype":"I32","shape":[4,1],"data_offsets":[0,16]},' \
       '"a.weight":{"dtype":"BF16","shape":[4,8],"data_offsets":[16,80]}'
EDGE_CASES = {
    "metadata null": ("{" + HEAD + ',"__metadata__":null,"b":' + ENTRY_B + "}", "equal to safetensors"),
    "metadata false": ("{" + HEAD + ',"__metadata__":false,"b":' + ENTRY_B + "}", "both refuse"),
    "metadata 0": ("{" + HEAD + ',"__metadata__":0,"b":' + ENTRY_B + "}", "both refuse"),
    "metadata empty string": ("{" + HEAD + ',"__metadata__":"","b":' + ENTRY_B + "}", "both refuse"),
    "metadata empty list": ("{" + HEAD + ',"__metadata__":[],"b":' + ENTRY_B + "}", "both refuse"),
    "duplicate entry field": ("{" + HEAD + ',"b":{"dtype":"I8","dtype":"U8","shape":[2,2],"data_offsets":[80,84]}}',
                              "both refuse"),
    "duplicate __metadata__": ("{" + HEAD + ',"__metadata__":{},"__metadata__":{},"b":' + ENTRY_B + "}", "both refuse"),
    "duplicate tensor name": ("{" + HEAD + ',"b":' + ENTRY_B + ',"b":' + ENTRY_B + "}", "stricter: duplicate key"),
    "NaN in an extra field": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":NaN}}', "both refuse"),
    "Infinity in metadata": ("{" + HEAD + ',"__metadata__":{"a":Infinity},"b":' + ENTRY_B + "}", "both refuse"),
    "1e999 in an extra field": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":1e999}}', "both refuse"),
    "lone surrogate in a name": ("{" + HEAD + ',"b\\ud800":' + ENTRY_B + "}", "both refuse"),
    "lone surrogate in metadata": ("{" + HEAD + ',"__metadata__":{"a":"\\udc00"},"b":' + ENTRY_B + "}",
                                   "both refuse"),
    "lone surrogate in an extra field": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":["\\ud800"]}}', "both refuse"),
    "surrogate pair in a name": ("{" + HEAD + ',"b\\ud83d\\ude00":' + ENTRY_B + "}", "equal to safetensors"),
    "-0 offset": ("{" + HEAD.replace("[0,16]", "[-0,16]") + ',"b":' + ENTRY_B + "}", "both refuse"),
    "-0 in an extra field": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":-0}}', "equal to safetensors"),
    "5000-digit integer": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":' + "7" * 5000 + "}}", "both refuse"),
    "400-digit integer": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":' + "7" * 400 + "}}", "both refuse"),
    f"nesting {SERDE_DEPTH} deep": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":' + "[" * (SERDE_DEPTH - 2)
                                    + "]" * (SERDE_DEPTH - 2) + "}}", "equal to safetensors"),
    f"nesting {SERDE_DEPTH + 1} deep": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":' + "[" * (SERDE_DEPTH - 1)
                                        + "]" * (SERDE_DEPTH - 1) + "}}", "both refuse"),
    "nesting 100000 deep": ("{" + HEAD + ',"b":' + ENTRY_B[:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}}",
                            "both refuse"),
    "empty tensor, dims overflow u64": ("{" + HEAD + ',"b":' + ENTRY_B + ',"e":{"dtype":"U8","shape":'
                                        '[4611686018427387904,4,0],"data_offsets":[84,84]}}', "both refuse"),
    "empty tensor, dim 2**63": ("{" + HEAD + ',"b":' + ENTRY_B + ',"e":{"dtype":"U8","shape":[9223372036854775808,0],'
                                '"data_offsets":[84,84]}}', "both refuse"),
    "empty tensor, largest torch dim": ("{" + HEAD + ',"b":' + ENTRY_B + ',"e":{"dtype":"U8","shape":'
                                        '[9223372036854775807,0],"data_offsets":[84,84]}}', "equal to safetensors"),
    # the reader counts colons and braces to skip its per-object duplicate-key check; these defeat the count
    "colon and braces in a name": ("{" + HEAD + ',"b:{x}":' + ENTRY_B + "}", "equal to safetensors"),
    "duplicate entry field, colon in metadata": ("{" + HEAD + ',"__metadata__":{"t":"12:00"},"b":{"dtype":"U8",'
                                                 '"dtype":"U8","shape":[2,2],"data_offsets":[80,84]}}', "both refuse"),
    "duplicate tensor name, brace in metadata": ("{" + HEAD + ',"__metadata__":{"t":"{"},"b":' + ENTRY_B + ',"b":'
                                                 + ENTRY_B + "}", "stricter: duplicate key"),
    "unknown dtype the library reads": ("{" + HEAD + ',"b":' + ENTRY_B + ',"e":{"dtype":"F8_E8M0","shape":[0],'
                                        '"data_offsets":[84,84]}}', "stricter: unknown dtype"),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_json_edge_cases_agree_with_the_library(case, tmp_path):
    text, expected = EDGE_CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(_shard(text))
    try:
        entries, metadata = read_header(LocalDir(tmp_path), path.name)
        ours = (entries, {n: read_tensor(LocalDir(tmp_path), e) for n, e in entries.items()}, metadata)
    except RequantError as exc:
        assert "\n" not in str(exc) and path.name in str(exc)
        ours = exc
    assert compare_with_library(path, ours) == expected


def test_header_length_limit_is_the_librarys(tmp_path):
    """A header of 100,000,000 bytes is the largest the library reads; one byte more is refused by both."""
    for n, refused in ((MAX_HEADER_BYTES, False), (MAX_HEADER_BYTES + 1, True)):
        path = tmp_path / f"h{n}.safetensors"
        with open(path, "wb") as f:            # sparse: only the length prefix is written
            f.write(struct.pack("<Q", n))
            f.truncate(8 + n)
        if refused:
            with pytest.raises(CheckpointError, match="exceeds"):
                header_length(struct.pack("<Q", n), path.name, 8 + n)
        else:
            assert header_length(struct.pack("<Q", n), path.name, 8 + n) == n
        assert ("too large" in library_read(path).lower()) == refused, library_read(path)[:200]


@pytest.fixture(scope="module")
def clean_upstream(tiny_upstream) -> Path:
    return tiny_upstream


def _linked_copy(src: Path, root: Path) -> Path:
    """Hard links (symlinks out of the checkpoint are refused by the reader, rightly)."""
    for f in src.iterdir():
        os.link(f, root / f.name)
    return root


def test_baseline_plans(clean_upstream, tmp_path):
    assert _plan_outcome(_linked_copy(clean_upstream, tmp_path)) == "planned (valid)"


@st.composite
def mutated_json(draw, original: dict, paths: list[list[str]]):
    doc = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        target = doc
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):          # an earlier mutation replaced a parent
            continue
        target[path[-1]] = draw(json_values | st.sampled_from(["../../etc/passwd", "/abs/model.safetensors",
                                                                "missing.safetensors", -1, 0, 2 ** 40, 10 ** 7]))
    return doc


def _paths(doc, prefix=(), depth=3):
    out = []
    if isinstance(doc, dict) and depth:
        for key, value in doc.items():
            out.append([*prefix, key])
            out += _paths(value, (*prefix, key), depth - 1)
    return out


def _plan_outcome(root: Path) -> str:
    try:
        build_plan(LocalDir(root), load_recipe("kimi-k2.6-mxfp4"))
        return "planned (valid)"
    except RequantError as exc:
        assert str(exc).strip(), "empty error message"
        return "clear error"


@settings(max_examples=scale(60, 600), **SETTINGS)
@given(data=st.data())
def test_mutated_config_and_index(tmp_path_factory, clean_upstream, ledger, data):
    root = _linked_copy(clean_upstream, tmp_path_factory.mktemp("fuzz-plan"))
    which = data.draw(st.sampled_from(["config.json", "model.safetensors.index.json"]))
    original = json.loads((clean_upstream / which).read_text())
    paths = _paths(original)
    if which == "model.safetensors.index.json":
        paths = [["weight_map", k] for k in list(original["weight_map"])[:40]] + [["weight_map"], ["metadata"]]
    (root / which).unlink()
    (root / which).write_text(json.dumps(data.draw(mutated_json(original, paths))))
    rss = psutil.Process().memory_info().rss
    ledger.record(f"{which} fuzz", _plan_outcome(root))
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 512 << 20, f"planning a mutated {which} grew memory by {grown >> 20} MB"


def test_malformed_json_files(tmp_path, clean_upstream, ledger):
    for which in ("config.json", "model.safetensors.index.json"):
        for content in (b"", b"{", b"\xff\xfe", b"[]", b"null", b"{\"weight_map\": 5}", b"1e999999"):
            root = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
            shutil.copytree(clean_upstream, root)
            (root / which).write_bytes(content)
            outcome = _plan_outcome(root)
            assert outcome == "clear error", (which, content)
            ledger.record(f"{which} fuzz", outcome)
