"""Coalesced byte-range reads: a job's tensors are fetched as a few large spans instead of one request
per tensor (208k tensors would otherwise be 208k GETs). Spans merge neighbouring tensors of one file
when the gap between them is small, up to a size cap; a small LRU of spans serves interleaved regions
(safetensors groups tensors by dtype, so a module's weight and scale sit in different regions).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from requant.io.safetensors import TensorEntry, bytes_to_tensor

MAX_SPAN = 64 * 1024 * 1024
MAX_GAP = 256 * 1024
CACHED_SPANS = 4


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
                start, end = e.start, e.end
            end = max(end, e.end)
            members.append(e)
        if members:
            span = Span(file, start, end)
            spans.update({m.name: span for m in members})
    return spans


class CoalescingReader:
    def __init__(self, storage, entries: list[TensorEntry]):
        self.storage = storage
        self.spans = plan_spans(entries)
        self._cache: OrderedDict[Span, bytes] = OrderedDict()
        self.requests = 0

    @property
    def uri(self) -> str:
        return self.storage.uri

    def read(self, entry: TensorEntry) -> torch.Tensor:
        span = self.spans.get(entry.name)
        if span is None or entry.nbytes > MAX_SPAN:
            self.requests += 1
            return bytes_to_tensor(self.storage.read_range(entry.file, entry.start, entry.end), entry)
        data = self._cache.get(span)
        if data is None:
            self.requests += 1
            data = self.storage.read_range(span.file, span.start, span.end)
            self._cache[span] = data
            while len(self._cache) > CACHED_SPANS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(span)
        return bytes_to_tensor(data[entry.start - span.start : entry.end - span.start], entry)
