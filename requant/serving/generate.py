"""Text completion on the reference model: tokenize, prefill, decode, sample, stop strings, logprobs.

One sequence at a time (the model is guarded by a lock in the server); this is a correctness
reference and a smoke-test target, not a throughput engine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from requant.errors import CheckpointError
from requant.serving.checkpoint import load_checkpoint
from requant.serving.model import DeepseekV3Text


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None     # number of top alternatives per token (0 = only the sampled token)
    echo: bool = False
    ignore_eos: bool = False
    tokens_as_ids: bool = False     # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"


@dataclass
class Completion:
    text: str
    finish_reason: str              # "stop" (stop string or EOS) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: dict | None = None
    token_ids: list[int] = field(default_factory=list)


class Generator:
    """Owns the model and tokenizer of one checkpoint; ``complete`` is thread-safe (serialised)."""

    def __init__(self, model: DeepseekV3Text, tokenizer: Tokenizer, add_bos: bool, max_model_len: int):
        self.model, self.tokenizer = model, tokenizer
        self.add_bos = add_bos and model.cfg.bos_token_id is not None
        self.max_model_len = min(max_model_len, model.cfg.max_positions)
        self.eos = model.cfg.eos_token_id
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, uri: str, max_model_len: int = 8192, device: str = "cpu") -> Generator:
        ckpt = load_checkpoint(uri)
        storage = ckpt.storage
        if not storage.exists("tokenizer.json"):
            raise CheckpointError(f"{uri}/tokenizer.json", "missing; the reference server needs a tokenizers-format "
                                  "tokenizer (tokenizers that need upstream remote code are not run)")
        tokenizer = Tokenizer.from_str(storage.read_bytes("tokenizer.json").decode("utf-8"))
        add_bos = False
        if storage.exists("tokenizer_config.json"):
            add_bos = bool(json.loads(storage.read_bytes("tokenizer_config.json")).get("add_bos_token", False))
        return cls(DeepseekV3Text(ckpt, device), tokenizer, add_bos, max_model_len)

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return ([self.model.cfg.bos_token_id] if self.add_bos else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def expert_counts(self, prompt_ids: list[int]) -> dict[int, list[int]]:
        """Routed-token counts per MoE layer and expert for one prompt (see DeepseekV3Text.expert_counts)."""
        with self._lock:
            return self.model.expert_counts(torch.tensor(prompt_ids, dtype=torch.long))

    def complete(self, prompt_ids: list[int], params: SamplingParams, choice: int = 0,
                 on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Completion:
        with self._lock:
            return self._complete(prompt_ids, params, choice, on_text, cancelled)

    def _complete(self, prompt_ids, params, choice, on_text, cancelled) -> Completion:
        cache = self.model.new_cache()
        logits = self.model.forward(torch.tensor(prompt_ids, dtype=torch.long), cache)
        rng = None
        if params.temperature > 0:
            rng = torch.Generator()
            rng.manual_seed(params.seed + choice if params.seed is not None else torch.seed())
        holdback = max((len(s) for s in params.stop), default=1) - 1
        lp = _LogprobLog(self, params.logprobs, params.tokens_as_ids) if params.logprobs is not None else None
        if lp is not None and params.echo:
            lp.add_prompt(prompt_ids, logits)
        out: list[int] = []
        text, emitted, finish = "", 0, "length"
        whole = 0  # length of the text as of the last token that did not end inside a UTF-8 character
        next_logits = logits[-1]
        for _ in range(params.max_tokens):
            if cancelled is not None and cancelled():
                break
            token = _sample(next_logits, params.temperature, params.top_p, rng)
            if token == self.eos and not params.ignore_eos:
                finish = "stop"
                break
            if lp is not None:
                lp.add(token, next_logits)
            out.append(token)
            text = self.decode(out)
            if not text.endswith("\ufffd"):
                whole = len(text)
            cut = _first_stop(text, params.stop, max(0, emitted - holdback))
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            if len(out) == params.max_tokens:
                break
            next_logits = self.model.forward(torch.tensor([token]), cache)[-1]
            if on_text is not None:
                safe = len(text) - holdback
                if text.endswith("\ufffd"):          # an incomplete UTF-8 sequence: wait for the next token
                    safe = min(safe, whole)
                if safe > emitted:
                    on_text(text[emitted:safe])
                    emitted = safe
        if text.endswith("\ufffd"):  # ended inside a character: drop the pending bytes, as vLLM's detokenizer does
            text = text[:whole]
        if on_text is not None and len(text) > emitted:
            on_text(text[emitted:])
        prefix = self.decode(prompt_ids) if params.echo else ""
        logprobs = lp.result() if lp is not None else None
        return Completion(prefix + text, finish, len(prompt_ids), len(out), logprobs, out)


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _sample(logits: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p      # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=rng))


class _LogprobLog:
    """OpenAI legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, gen: Generator, top: int, as_ids: bool = False):
        self.gen, self.top, self.as_ids = gen, top, as_ids
        self.tokens: list[str] = []
        self.texts: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []

    def _name(self, token: int) -> str:
        # A token that is part of a UTF-8 character decodes to U+FFFD; its id is what tells two apart.
        return f"token_id:{token}" if self.as_ids else self.gen.decode([token])

    def _entry(self, token: int, logits: torch.Tensor | None) -> None:
        self.texts.append(self.gen.decode([token]))
        self.tokens.append(self._name(token))
        if logits is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        logp = torch.log_softmax(logits.double(), dim=-1)
        self.token_logprobs.append(float(logp[token]))
        alts: dict[str, float] = {}
        if self.top:
            values, ids = logp.topk(self.top)
            for v, i in zip(values.tolist(), ids.tolist()):
                alts.setdefault(self._name(i), v)
        alts.setdefault(self.tokens[-1], float(logp[token]))
        self.top_logprobs.append(alts)

    def add_prompt(self, prompt_ids: list[int], logits: torch.Tensor) -> None:
        for k, token in enumerate(prompt_ids):
            self._entry(token, logits[k - 1] if k else None)

    def add(self, token: int, logits: torch.Tensor) -> None:
        self._entry(token, logits)

    def result(self) -> dict:
        offsets, pos = [], 0
        for text in self.texts:
            offsets.append(pos)
            pos += len(text)
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": offsets}
