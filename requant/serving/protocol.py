"""OpenAI ``/v1/completions`` request validation and response shapes.

Parsing is explicit rather than a pydantic model so every bad field gets a precise one-line message,
and unknown fields (lm-eval sends ``seed`` and others) are ignored as the OpenAI API does.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from requant.serving.generate import SamplingParams

MAX_PROMPTS = 64          # list prompts per request
MAX_CHOICES = 8           # n
MAX_STOPS = 16            # OpenAI allows 4; vLLM more. lm-eval's gsm8k sends 3.
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20         # vLLM's default cap
# requant's own route (not OpenAI's): routed-token counts per expert; vLLM and others answer 404 there, and the
# smoke test then reports expert coverage as unknown.
EXPERT_COUNTS_PATH = "/requant/v1/expert_counts"


class RequestError(Exception):
    """A bad request: becomes an OpenAI-style error body with a 4xx status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str]
    params: SamplingParams
    n: int
    stream: bool


def _number(body: dict, key: str, default, kind: type, lo: float | None = None, hi: float | None = None):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)[:40]}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return kind(value)


def parse_completion(raw: bytes, served_model: str) -> CompletionRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        model = served_model
    if model != served_model:
        raise RequestError(f"model '{str(model)[:80]}' does not exist; this server serves '{served_model}'",
                           "model", 404, "not_found_error")
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required", "prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a non-empty list of strings (token-id prompts are not supported)", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
    max_tokens = _number(body, "max_tokens", 16, int)
    if max_tokens < 1:
        raise RequestError(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    logprobs = _number(body, "logprobs", None, int, 0, MAX_LOGPROBS)
    seed = _number(body, "seed", None, int, -(2 ** 63), 2 ** 63 - 1)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0) or 1.0,
        seed=seed,
        stop=tuple(stops),
        logprobs=logprobs,
        echo=bool(body.get("echo", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
        tokens_as_ids=bool(body.get("return_tokens_as_token_ids", False)),  # vLLM's extension
    )
    if params.top_p <= 0:
        raise RequestError("'top_p' must be greater than 0", "top_p")
    n = _number(body, "n", 1, int, 1, MAX_CHOICES)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")
    return CompletionRequest(model, prompts, params, n, stream)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
