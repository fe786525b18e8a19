"""`requant serve` refuses work beyond 16 requests in flight with 429 (README; ``--max-pending``, default 16),
and serves again once they finish.

Deterministic: the app is the one ``requant serve`` builds from its command line (the CLI runs with the model
loader and ``uvicorn.run`` replaced), served by uvicorn on loopback, with a generator that holds every request at
a gate until the test opens it. So exactly 16 are known to be in flight when the 17th arrives, for plain and
for streamed completions.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from requant.cli import main
from requant.serving import server as server_module
from requant.serving.generate import Completion

MAX_PENDING = 16            # the README's number and `requant serve`'s default
BODY = {"model": "gated", "prompt": "Question: 2 + 2?\nAnswer:", "max_tokens": 4, "temperature": 0}


class GatedGenerator:
    """Stands in for the model: each completion waits at the gate, so requests stay in flight until released."""

    max_model_len = 1024
    model = SimpleNamespace(schemes={"mxfp4": 1})          # what `requant serve` prints at start-up

    def __init__(self):
        self.entered = threading.Semaphore(0)
        self.open = threading.Event()

    def encode(self, prompt: str) -> list[int]:
        return list(range(1, len(prompt.split()) + 2))

    def complete(self, ids, params, choice=0, on_text=None, cancelled=None) -> Completion:
        self.entered.release()
        if not self.open.wait(60):
            raise TimeoutError("the test never opened the gate")
        if on_text is not None:
            on_text("four")
        return Completion(text="four", finish_reason="length", prompt_tokens=len(ids), completion_tokens=1)

    def close_gate(self) -> None:
        self.open.clear()
        self.entered = threading.Semaphore(0)


@pytest.fixture(scope="module")
def served():
    """(base URL, gate) of the app `requant serve CKPT --served-model-name gated` builds, without --max-pending."""
    gate = GatedGenerator()
    built = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_module.Generator, "from_checkpoint", classmethod(lambda cls, uri, max_model_len, device="cpu": gate))
        mp.setattr(uvicorn, "run", lambda app, **kwargs: built.update(app=app, **kwargs))
        assert main(["serve", "unused-checkpoint", "--served-model-name", "gated"]) == 0
    server = uvicorn.Server(uvicorn.Config(built["app"], host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", gate
    gate.open.set()
    server.should_exit = True
    thread.join(30)


def _post(base: str, timeout: float = 60, **extra) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={**BODY, **extra}, timeout=timeout)


def _assert_busy(base: str, **extra) -> None:
    """One more request now must be refused at once; one that is admitted waits at the closed gate instead."""
    try:
        response = _post(base, timeout=10, **extra)
    except httpx.TimeoutException:
        raise AssertionError(f"request {MAX_PENDING + 1} was admitted (it waited for the model), "
                             f"not refused with 429") from None
    assert response.status_code == 429, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and f"{MAX_PENDING} requests in flight" in error["message"]


def test_request_17_gets_429_while_16_are_in_flight(served):
    base, gate = served
    gate.close_gate()
    with ThreadPoolExecutor(MAX_PENDING) as pool:
        held = [pool.submit(_post, base) for _ in range(MAX_PENDING)]
        try:
            for i in range(MAX_PENDING):                        # all 16 admitted: each has reached the model
                assert gate.entered.acquire(timeout=30), f"only {i} of {MAX_PENDING} requests were admitted"
            _assert_busy(base)
            assert not any(f.done() for f in held)
            assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # health is never refused
        finally:
            gate.open.set()
        replies = [f.result() for f in held]
    assert [r.status_code for r in replies] == [200] * MAX_PENDING
    assert all(r.json()["choices"][0]["text"] == "four" for r in replies)
    again = _post(base)                                         # all 16 finished: served again
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == "four"


def test_streamed_requests_count_until_their_stream_ends(served):
    base, gate = served
    gate.close_gate()
    started = threading.Semaphore(0)

    def stream() -> tuple[int, str]:
        with httpx.stream("POST", f"{base}/v1/completions", json={**BODY, "stream": True}, timeout=60) as r:
            started.release()                                   # headers arrived: the server has counted it
            return r.status_code, r.read().decode()

    with ThreadPoolExecutor(MAX_PENDING) as pool:
        held = [pool.submit(stream) for _ in range(MAX_PENDING)]
        try:
            for i in range(MAX_PENDING):
                assert started.acquire(timeout=30), f"only {i} of {MAX_PENDING} streams started"
            _assert_busy(base, stream=True)
            _assert_busy(base)
        finally:
            gate.open.set()
        replies = [f.result() for f in held]
    assert all(status == 200 and '"four"' in text and text.rstrip().endswith("data: [DONE]")
               for status, text in replies)
    assert _post(base, stream=True).status_code == 200
    assert _post(base).status_code == 200
