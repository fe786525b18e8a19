"""What one GSM8K evaluation of one served variant produced: scores per seed and filter, per-item outcomes.

This is the contract between the lm-eval runner (``gsm8k.py``) and the comparison/report code
(``stats.py``, ``compare.py``, ``report.py``); it round-trips through JSON so it can live in object storage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FILTERS = ("flexible-extract", "strict-match")


@dataclass(frozen=True)
class GSM8KResult:
    variant: str                                # e.g. "kimi-k2.6-mxfp4" or "fp8-reference"
    model: str                                  # the served model name the requests used
    base_url: str                               # the /v1 base URL that was evaluated
    num_fewshot: int
    limit: int | None                           # None = the whole test split
    seeds: list[int]
    doc_ids: list[int]                          # test-set row indices evaluated, in order
    # scores[filter][str(seed)] = exact_match accuracy in [0, 1] as lm-eval reports it
    scores: dict[str, dict[str, float]]
    # items[filter][str(seed)][k] = 1 if doc_ids[k] was answered correctly, else 0
    items: dict[str, dict[str, list[int]]]
    # seconds of wall time per seed (lm-eval call, all requests included)
    wall_seconds: dict[str, float] = field(default_factory=dict)
    # per-seed sample log paths (JSONL, lm-eval's per-sample records), relative to the result's directory
    samples: dict[str, str] = field(default_factory=dict)
    lm_eval_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GSM8KResult:
        return cls(**data)
