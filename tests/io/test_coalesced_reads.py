"""Coalesced range reads return exactly the tensors single reads return, with far fewer requests; span buffers are
reused only once nothing views them."""

from __future__ import annotations

import torch

from requant.io.ranges import CoalescingReader, SpanBuffers, plan_spans
from requant.io.safetensors import TensorEntry, read_header, read_tensor
from requant.io.storage import LocalDir


class CountingStorage(LocalDir):
    calls = 0

    def read_range(self, path, start, end):
        CountingStorage.calls += 1
        return super().read_range(path, start, end)

    def read_into(self, path, start, buf):
        CountingStorage.calls += 1
        return super().read_into(path, start, buf)


def test_spans_merge_neighbours_and_respect_caps():
    e = [TensorEntry(f"t{i}", "f", "U8", (10,), 100 + 10 * i, 110 + 10 * i) for i in range(5)]
    far = TensorEntry("far", "f", "U8", (10,), 10_000_000, 10_000_010)
    spans = plan_spans([*e, far], max_span=35, max_gap=1000)
    assert spans["t0"] == spans["t2"] != spans["t3"]  # cap 35 bytes -> three tensors per span
    assert spans["far"].start == 10_000_000  # gap too large -> its own span


def test_reader_returns_the_same_tensors_with_fewer_requests(tiny_upstream):
    storage = CountingStorage(tiny_upstream)
    entries = []
    for shard in sorted(p.name for p in tiny_upstream.glob("*.safetensors")):
        entries += list(read_header(storage, shard)[0].values())
    CountingStorage.calls = 0
    reader = CoalescingReader(storage, entries)
    for entry in sorted(entries, key=lambda e: (e.file, e.start)):
        assert torch.equal(reader.read(entry).view(torch.uint8), read_tensor(LocalDir(tiny_upstream), entry).view(torch.uint8))
    assert reader.requests == CountingStorage.calls <= 8 < len(entries)


def test_read_ahead_in_a_known_order_returns_the_same_tensors_and_frees_spans(tiny_upstream):
    """With the read order given, spans are fetched ahead on threads (each once) and dropped after their last
    tensor; tensors are views of the span buffers, equal to single reads."""
    storage = CountingStorage(tiny_upstream)
    entries = []
    for shard in sorted(p.name for p in tiny_upstream.glob("*.safetensors")):
        entries += list(read_header(storage, shard)[0].values())
    order = sorted(entries, key=lambda e: (e.file, e.name))  # name order interleaves the dtype regions
    CountingStorage.calls = 0
    # small spans: many of them, several in use at a time
    reader = CoalescingReader(storage, entries, order=order, ahead=2, max_span=64 * 1024)
    held = 0
    try:
        for entry in order:
            got = reader.read(entry)
            assert torch.equal(got.view(torch.uint8), read_tensor(LocalDir(tiny_upstream), entry).view(torch.uint8)), entry.name
            held = max(held, len(reader._cache))
    finally:
        reader.close()
    big = [e for e in entries if e.nbytes > 64 * 1024]  # larger than a span: read on their own
    spans = {reader.spans[e.name] for e in entries if e.nbytes <= 64 * 1024}
    assert reader.requests == CountingStorage.calls == len(spans) + len(big) and len(spans) > 10
    assert held <= 2 + 2 and not reader._cache


def test_a_span_buffer_is_lent_again_only_once_nothing_views_it():
    size = SpanBuffers.MIN_BYTES
    pool = SpanBuffers(keep=2)
    first = pool.take(4 * size)
    view = torch.frombuffer(memoryview(first)[8:16], dtype=torch.uint8)
    del first
    second = pool.take(4 * size)  # the first is still viewed: a new one
    assert len(pool._buffers) == 1 + 2
    del second
    assert isinstance(pool.take(size), bytearray)  # the idle second is too large for it: a new one
    third = pool.take(3 * size)  # the idle second
    assert isinstance(third, memoryview) and len(third) == 3 * size and len(pool._buffers) == 1 + 3
    del view, third
    assert isinstance(pool.take(4 * size), memoryview) and len(pool._buffers) == 1 + 3
    assert isinstance(pool.take(10), bytearray) and len(pool._buffers) == 1 + 3  # below MIN_BYTES: never pooled



def test_idle_buffers_beyond_keep_are_let_go_by_identity_not_by_their_bytes():
    size = SpanBuffers.MIN_BYTES
    pool = SpanBuffers(keep=0)
    used = pool.take(4 * size)  # in use, all zeros
    idle = pool.take(4 * size)  # all zeros too, then idle
    del idle
    new = pool.take(8 * size)  # nothing fits: the idle one goes, not the one in use that compares equal to it
    assert any(buf is used for buf in pool._buffers) and any(buf is new for buf in pool._buffers)
    assert len(pool._buffers) == 1 + 2


def test_tensors_held_past_their_span_keep_their_bytes_while_buffers_are_reused(tiny_upstream, monkeypatch):
    """Every span pooled (MIN_BYTES lowered): tensors kept while the reader goes on must not see a reused buffer's
    new bytes, and buffers must still be reused (fewer than spans)."""
    monkeypatch.setattr(SpanBuffers, "MIN_BYTES", 1)
    storage = LocalDir(tiny_upstream)
    entries = []
    for shard in sorted(p.name for p in tiny_upstream.glob("*.safetensors")):
        entries += list(read_header(storage, shard)[0].values())
    order = sorted(entries, key=lambda e: (e.file, e.name))
    reader = CoalescingReader(storage, entries, order=order, ahead=2, max_span=64 * 1024)
    try:
        kept = {}
        for i, entry in enumerate(order):
            tensor = reader.read(entry)
            if i % 3 == 0:  # the rest released on the way
                kept[entry.name] = tensor
        del tensor
        for entry in order:
            if entry.name in kept:
                assert torch.equal(kept[entry.name].view(torch.uint8), read_tensor(storage, entry).view(torch.uint8))
    finally:
        reader.close()
    spans = {reader.spans[e.name] for e in entries if e.nbytes <= 64 * 1024}
    assert len(reader._buffers._buffers) - 1 < len(spans)
