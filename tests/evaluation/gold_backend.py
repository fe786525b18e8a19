"""A real OpenAI-style completions server for tests that answers GSM8K questions from the test split.

It finds the last ``Question: ...\\nAnswer:`` in the prompt, looks the question up in ``test.jsonl`` and answers:

- ``gold``: the reference answer (reasoning + ``#### N``) followed by the junk a real model rambles on with,
  cut at the earliest string of the request's ``stop`` list, so the junk never reaches the scorer;
- ``wrong``: the same with the final ``#### N`` replaced by a different number (the last number of the text);
- ``ignore-stop``: the gold answer plus the junk, not cut at ``stop``.

The server is stdlib ``http.server`` on 127.0.0.1 in a background thread; it records every request it receives.
"""

from __future__ import annotations

import json
import re
import threading
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODES = ("gold", "wrong", "ignore-stop")
JUNK_NUMBER = "98765"  # the final number of the junk; no GSM8K test answer equals it
JUNK = (f"\n\nQuestion: How many apples are in 12345 baskets of 8 apples each?\n"
        f"Answer: There are 12345 * 8 = 98760 apples, plus 5 more. #### {JUNK_NUMBER}\n\n")
FINAL_ANSWER = re.compile(r"#### (.+?)\s*$")


def wrong_number(number: str) -> str:
    """A final answer that differs from ``number`` after lm-eval's normalisation (commas, '$', trailing '.')."""
    return str(Decimal(number.replace(",", "").replace("$", "")) + 1)


def answer_text(gold: str, mode: str, stop: list[str]) -> tuple[str, str]:
    """The completion text and finish_reason for one question whose reference answer is ``gold``."""
    if mode == "wrong":
        final = FINAL_ANSWER.search(gold)
        gold = gold[:final.start(1)] + wrong_number(final.group(1))
    text = gold + JUNK
    if mode == "ignore-stop":
        return text, "length"
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[:min(cuts)], "stop") if cuts else (text, "length")


class GoldBackend:
    """Context manager: ``with GoldBackend(gsm8k_dir, "gold") as backend: backend.url ...``."""

    def __init__(self, gsm8k_dir: str | Path, mode: str = "gold", model: str = "gold-model"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.model = mode, model
        rows = [json.loads(line) for line in (Path(gsm8k_dir) / "test.jsonl").read_text().splitlines() if line]
        self.answers = {row["question"]: row["answer"] for row in rows}
        self.requests: list[dict[str, Any]] = []      # JSON bodies of POST /v1/completions, in arrival order
        self.auth_headers: list[str | None] = []      # the Authorization header of each of them
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> GoldBackend:
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                if self.path == "/health":
                    self._reply(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self._reply(200, {"object": "list", "data": [{"id": backend.model, "object": "model"}]})
                else:
                    self._reply(404, {"error": f"no route {self.path}"})

            def do_POST(self):
                if self.path != "/v1/completions":
                    self._reply(404, {"error": f"no route {self.path}"})
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with backend._lock:
                    backend.requests.append(body)
                    backend.auth_headers.append(self.headers.get("Authorization"))
                status, payload = backend.complete(body)
                self._reply(status, payload)

            def _reply(self, status: int, payload: dict[str, Any]):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="gold-backend", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Answer one completions request; unknown fields are ignored."""
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        choices = []
        for index, prompt in enumerate(prompts or []):
            question = prompt.rsplit("Question: ", 1)[-1].removesuffix("\nAnswer:")
            if question not in self.answers:
                return 400, {"error": {"message": f"unknown question: {question[:80]!r}"}}
            text, finish_reason = answer_text(self.answers[question], self.mode, stop)
            choices.append({"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None})
        if not choices:
            return 400, {"error": {"message": "prompt must be a string or a non-empty list of strings"}}
        completion_tokens = sum(len(c["text"].split()) for c in choices)
        prompt_tokens = sum(len(p.split()) for p in prompts)
        return 200, {
            "id": f"cmpl-{len(self.requests)}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model", self.model), "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }
