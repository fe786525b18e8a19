"""Coalesced byte-range reads: a job's tensors are fetched as a few large spans instead of one request
per tensor (208k tensors would otherwise be 208k GETs). Spans merge neighbouring tensors of one file
when the gap between them is small, up to a size cap.

Given the order in which tensors will be read, the reader fetches the next spans ahead of use on a few
threads (several range GETs in flight on object storage, where one stream carries ~100-200 MB/s) and drops
each span after its last tensor was read, so memory stays at about ``ahead + 1`` spans. Tensors are views
of the span buffers, read straight into them where the storage can (``read_into``): no copy after the read.
Without an order it keeps a small LRU of spans (safetensors groups tensors by dtype, so a module's weight
and scale sit in different regions).

Large span buffers are reused once nothing views them any more (:class:`SpanBuffers`): reading into fresh memory
costs a page fault per 4 KB, which on tmpfs made a read three times slower than the copy itself.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from requant import stages
from requant.io.safetensors import DTYPES, TensorEntry

MAX_SPAN = 64 * 1024 * 1024
MAX_GAP = 256 * 1024
CACHED_SPANS = 4
ALIGN = 8  # spans start at a multiple of 8 file bytes: tensor views keep their file alignment


class SpanBuffers:
    """Buffers for spans of at least ``MIN_BYTES``, each lent again once nothing refers to it but this pool: the
    tensors a reader hands out are views of its buffer (through memoryviews, which hold a reference to it), so
    CPython's reference count says when the last of them is gone. The count of an idle buffer is read off a probe
    that nothing else ever refers to, counted by the same code. A buffer is lent for a span of at most its size and
    at least ``1 / SLACK`` of it, so a small span never pins a large buffer; at most ``keep`` idle ones are kept.
    Lending happens on one thread (the reader's caller)."""

    MIN_BYTES = 1 << 20
    SLACK = 2

    def __init__(self, keep: int):
        self._buffers: list[bytearray] = [bytearray(0)]  # the probe first
        self._keep = keep

    def _idle(self) -> list[bytearray]:
        counts = [sys.getrefcount(buf) for buf in self._buffers]
        return [buf for buf, count in zip(self._buffers[1:], counts[1:]) if count == counts[0]]

    def take(self, size: int) -> bytearray | memoryview:
        """A buffer of exactly ``size`` bytes: the first ``size`` bytes of an idle one, or a new one."""
        if size < self.MIN_BYTES:
            return bytearray(size)
        idle = self._idle()
        fits = next((buf for buf in idle if size <= len(buf) <= size * self.SLACK), None)
        if fits is not None:
            return memoryview(fits)[:size]
        drop = {id(buf) for buf in idle[self._keep:]}  # idle buffers of other sizes beyond ``keep``: let them go
        if drop:  # by identity: bytearrays compare equal by their bytes
            self._buffers = [buf for buf in self._buffers if id(buf) not in drop]
        del idle
        buf = bytearray(size)
        self._buffers.append(buf)
        return buf


@dataclass(frozen=True)
class Span:
    file: str
    start: int
    end: int


def plan_spans(entries: list[TensorEntry], max_span: int = MAX_SPAN, max_gap: int = MAX_GAP) -> dict[str, Span]:
    """Map each tensor name to the span that will carry its bytes."""
    spans: dict[str, Span] = {}
    by_file: dict[str, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    for file, group in by_file.items():
        group.sort(key=lambda e: e.start)
        members: list[TensorEntry] = []
        start = end = None
        for e in group:
            if start is not None and (e.start - end > max_gap or max(end, e.end) - start > max_span):
                span = Span(file, start, end)
                spans.update({m.name: span for m in members})
                members, start = [], None
            if start is None:
                start, end = e.start - e.start % ALIGN, e.end
            end = max(end, e.end)
            members.append(e)
        if members:
            span = Span(file, start, end)
            spans.update({m.name: span for m in members})
    return spans


class CoalescingReader:
    """Reads a job's tensors by span. ``order``: the entries in the order :meth:`read` will ask for them (each
    once), which enables read-ahead of ``ahead`` spans and freeing spans after their last use."""

    def __init__(self, storage, entries: list[TensorEntry], order: list[TensorEntry] | None = None, ahead: int = 0,
                 max_span: int = MAX_SPAN):
        self.storage = storage
        self.max_span = max_span
        self.spans = plan_spans(entries, max_span)
        self._cache: OrderedDict[Span, bytearray] = OrderedDict()
        self.requests = 0
        self._sequence: list[Span] = []
        self._uses: dict[Span, int] = {}
        self._pending: dict[Span, Future] = {}
        self._next = 0  # index into _sequence of the next span not yet submitted
        self._pool = None
        self._buffers = SpanBuffers(keep=max(ahead, 1) + 2)
        if order is not None:
            for e in order:
                span = self.spans.get(e.name)
                if span is None or e.nbytes > max_span:
                    continue
                if span not in self._uses:
                    self._sequence.append(span)
                self._uses[span] = self._uses.get(span, 0) + 1
            if ahead > 0:
                self._pool = ThreadPoolExecutor(ahead, thread_name_prefix="requant-read")
                self._ahead = ahead

    @property
    def uri(self) -> str:
        return self.storage.uri

    def close(self) -> None:
        """Stop reading ahead (reads in flight finish; nothing else starts) and drop every buffer."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._cache.clear()

    def _fetch(self, file: str, start: int, end: int, buf: bytearray | memoryview | None = None) -> bytearray | memoryview:
        """The bytes ``start..end`` of ``file``, read into ``buf`` where given (and the storage can)."""
        self.requests += 1
        with stages.timed("read"):
            read_into = getattr(self.storage, "read_into", None)
            if read_into is None:
                return bytearray(self.storage.read_range(file, start, end))
            buf = bytearray(end - start) if buf is None else buf
            read_into(file, start, buf)
            return buf

    def _span_bytes(self, span: Span) -> bytearray:
        if self._pool is not None:
            # up to ``ahead`` reads in flight, and no more than ``ahead + 2`` buffers (a module's tensors sit in
            # up to two dtype regions, so two spans are in use at a time)
            while (self._next < len(self._sequence) and len(self._pending) < self._ahead
                   and len(self._pending) + len(self._cache) < self._ahead + 2):
                s = self._sequence[self._next]
                self._pending[s] = self._pool.submit(self._fetch, s.file, s.start, s.end, self._buffers.take(s.end - s.start))
                self._next += 1
        data = self._cache.get(span)
        if data is not None:
            self._cache.move_to_end(span)
            return data
        future = self._pending.pop(span, None)
        data = (future.result() if future is not None
                else self._fetch(span.file, span.start, span.end, self._buffers.take(span.end - span.start)))
        self._cache[span] = data
        if not self._uses:  # no order known: keep the most recently used spans
            while len(self._cache) > CACHED_SPANS:
                self._cache.popitem(last=False)
        return data

    def read(self, entry: TensorEntry) -> torch.Tensor:
        span = self.spans.get(entry.name)
        if span is None or entry.nbytes > self.max_span:
            return _tensor(self._fetch(entry.file, entry.start, entry.end), 0, entry)
        data = self._span_bytes(span)
        tensor = _tensor(data, entry.start - span.start, entry)
        if span in self._uses:
            self._uses[span] -= 1
            if not self._uses[span]:  # its last tensor: the views that were handed out keep what they need
                del self._uses[span]
                self._cache.pop(span, None)
        return tensor


def _tensor(data: bytearray | memoryview, offset: int, entry: TensorEntry) -> torch.Tensor:
    """A view of ``entry``'s bytes inside ``data`` (a copy if a malformed header left them misaligned)."""
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    view = memoryview(data)[offset : offset + entry.nbytes]
    if offset % DTYPES[entry.dtype][1]:
        view = bytearray(view)
    return torch.frombuffer(view, dtype=entry.torch_dtype).reshape(entry.shape)
