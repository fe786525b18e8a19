"""Fuzzing the checkpoint reader: mutated safetensors headers, index files and configs end in a clear
requant error or a correct result; never another exception, a hang, an allocation sized by a header field,
or a read outside the file."""

from __future__ import annotations

import json
import os
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
from safetensors.torch import save

from requant.errors import RequantError
from requant.io.safetensors import read_header, read_tensor
from requant.io.storage import LocalDir
from requant.plan import build_plan
from requant.recipe import load_recipe

BASE = save({"a.weight": torch.arange(32, dtype=torch.bfloat16).reshape(4, 8),
             "a.weight_packed": torch.arange(4, dtype=torch.int32).reshape(4, 1),
             "b": torch.arange(4, dtype=torch.uint8).reshape(2, 2)})
HEADER_LEN = struct.unpack("<Q", BASE[:8])[0]
HEADER = json.loads(BASE[8:8 + HEADER_LEN])
SETTINGS = dict(deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=False)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@st.composite
def mutated_shard(draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "length", "entry", "extra", "metadata"]))
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


@settings(max_examples=scale(300, 3000), **SETTINGS)
@given(data=mutated_shard())
def test_mutated_safetensors_headers(tmp_path_factory, ledger, data):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "model.safetensors").write_bytes(data)
    storage = BoundedReads(root)
    tracemalloc.start()
    try:
        entries, _ = read_header(storage, "model.safetensors")
        for entry in entries.values():
            tensor = read_tensor(storage, entry)
            assert tensor.numel() * tensor.element_size() == entry.nbytes
        outcome = "parsed (valid)"
    except RequantError as exc:
        message = str(exc)
        assert "\n" not in message and "model.safetensors" in message
        outcome = "clear error"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 * len(data) + (1 << 20), f"allocated {peak} bytes for a {len(data)}-byte file"
    ledger.record("safetensors header fuzz", outcome)


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
