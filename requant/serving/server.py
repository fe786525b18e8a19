"""``requant serve``: an OpenAI-compatible HTTP server over the reference model (FastAPI + uvicorn).

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` (also streamed as SSE), and
requant's own ``POST /requant/v1/expert_counts`` (routed-token counts per expert, for the smoke test).
Bounded by design: request bodies over ``max_body_bytes`` get 413, more than ``max_pending`` requests
in flight get 429, prompt + max_tokens beyond the context get 400; every error is an OpenAI-style JSON
body. Binds to 127.0.0.1 unless told otherwise; with an API key, /v1/* needs ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from requant.serving.generate import Generator
from requant.serving.protocol import EXPERT_COUNTS_PATH, RequestError, completion_body, completion_id, parse_completion

log = logging.getLogger("requant.serve")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (by Content-Length, or while they stream in) and
    bodies that stall for ``timeout_s`` between chunks (408), so slow clients cannot hold requests open."""

    def __init__(self, app, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, RequestError(f"request body over {self.limit} bytes", status=413))
        seen = 0

        async def limited():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise _Stalled() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _send_error(send, RequestError(f"request body over {self.limit} bytes", status=413))
        except _Stalled:
            await _send_error(send, RequestError(f"request body stalled for {self.timeout_s:.0f}s", status=408))


class _TooLarge(Exception):
    pass


class _Stalled(Exception):
    pass


async def _send_error(send, err: RequestError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(generator: Generator, served_model: str, api_key: str | None = None,
               max_body_bytes: int = 4 << 20, max_pending: int = 16, body_timeout_s: float = 30.0) -> FastAPI:
    app = FastAPI(title="requant reference server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes, timeout_s=body_timeout_s)
    pending = {"n": 0}
    created = int(time.time())

    def error(err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):                    # never a raw traceback to clients
        log.exception("unexpected error serving %s", request.url.path)
        return error(RequestError("internal error", status=500, kind="server_error"))

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error(RequestError(f"no route {request.method} {request.url.path}", status=404, kind="not_found_error"))

    @app.exception_handler(405)
    async def bad_method(request: Request, exc):
        return error(RequestError(f"method {request.method} not allowed on {request.url.path}", status=405))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return error(RequestError("missing or wrong API key", status=401, kind="authentication_error"))
        return {"object": "list", "data": [{"id": served_model, "object": "model", "created": created,
                                            "owned_by": "requant", "max_model_len": generator.max_model_len}]}

    async def parsed(request: Request):
        """The request's completion fields and its prompts as token ids (RequestError on a bad body)."""
        req = parse_completion(await request.body(), served_model)
        return req, [generator.encode(p) for p in req.prompts]

    @app.post(EXPERT_COUNTS_PATH)
    async def expert_counts(request: Request):
        """requant's extension: how many tokens each routed expert receives on the given prompts (a string or
        a list), so a client can check its prompts reach every expert. Same auth and limits as completions."""
        if not authorized(request):
            return error(RequestError("missing or wrong API key", status=401, kind="authentication_error"))
        try:
            req, prompts = await parsed(request)
            for ids in prompts:
                if not ids or len(ids) > generator.max_model_len:
                    raise RequestError(f"each prompt must have 1 to {generator.max_model_len} tokens", "prompt")
        except RequestError as err:
            return error(err)
        if pending["n"] >= max_pending:
            return error(RequestError(f"server busy: {max_pending} requests in flight", status=429, kind="rate_limit_error"))
        pending["n"] += 1
        totals: dict[int, list[int]] = {}
        try:
            for ids in prompts:
                counts = await anyio.to_thread.run_sync(generator.expert_counts, ids)
                for layer, row in counts.items():
                    totals[layer] = [a + b for a, b in zip(totals.get(layer, [0] * len(row)), row)]
        finally:
            pending["n"] -= 1
        return {"object": "expert_counts", "model": served_model, "tokens": sum(map(len, prompts)),
                "top_k": generator.model.cfg.top_k, "layers": {str(k): v for k, v in sorted(totals.items())}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        if not authorized(request):
            return error(RequestError("missing or wrong API key", status=401, kind="authentication_error"))
        try:
            req, prompts = await parsed(request)
            for ids in prompts:
                if len(ids) + req.params.max_tokens > generator.max_model_len:
                    raise RequestError(
                        f"this model's maximum context length is {generator.max_model_len} tokens; the request "
                        f"has {len(ids)} prompt tokens and max_tokens {req.params.max_tokens}", "max_tokens")
                if not ids:
                    raise RequestError("prompt is empty after tokenization", "prompt")
        except RequestError as err:
            return error(err)
        if pending["n"] >= max_pending:
            return error(RequestError(f"server busy: {max_pending} requests in flight", status=429, kind="rate_limit_error"))
        pending["n"] += 1
        if req.stream:
            return StreamingResponse(_stream(generator, req, prompts, pending), media_type="text/event-stream")
        try:
            return await _complete(generator, req, prompts)
        finally:
            pending["n"] -= 1

    return app


async def _complete(generator: Generator, req, prompts: list[list[int]]) -> dict[str, Any]:
    cid, choices, used_prompt, used_completion = completion_id(), [], 0, 0
    for p, ids in enumerate(prompts):
        used_prompt += len(ids)
        for j in range(req.n):
            out = await anyio.to_thread.run_sync(generator.complete, ids, req.params, j)
            used_completion += out.completion_tokens
            choices.append({"index": p * req.n + j, "text": out.text, "logprobs": out.logprobs,
                            "finish_reason": out.finish_reason})
    return completion_body(cid, req.model, choices, used_prompt, used_completion)


async def _stream(generator: Generator, req, prompts: list[list[int]], pending: dict):
    """SSE: one chunk per text delta, a final chunk per choice with its finish_reason, then [DONE]."""
    cid, loop = completion_id(), asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def chunk(index: int, text: str, finish: str | None) -> str:
        body = completion_body(cid, req.model, [{"index": index, "text": text, "logprobs": None,
                                                 "finish_reason": finish}], 0, 0)
        body.pop("usage")
        return f"data: {json.dumps(body)}\n\n"

    def work():
        try:
            for p, ids in enumerate(prompts):
                for j in range(req.n):
                    index = p * req.n + j
                    out = generator.complete(ids, req.params, j, cancelled=stop.is_set,
                                             on_text=lambda t, i=index: loop.call_soon_threadsafe(queue.put_nowait, chunk(i, t, None)))
                    loop.call_soon_threadsafe(queue.put_nowait, chunk(index, "", out.finish_reason))
        except Exception:                                                    # reported to the client, logged here
            log.exception("streaming completion failed")
            err = RequestError("internal error", status=500, kind="server_error")
            loop.call_soon_threadsafe(queue.put_nowait, f"data: {json.dumps(err.body())}\n\n")
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = loop.run_in_executor(None, work)
    try:
        while (item := await queue.get()) is not None:
            yield item
        yield "data: [DONE]\n\n"
    finally:
        stop.set()
        await task
        pending["n"] -= 1


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_model_len: int = 8192, max_body_bytes: int = 4 << 20,
          max_pending: int = 16, log_level: str = "info", body_timeout_s: float = 30.0, device: str = "cpu") -> None:
    import uvicorn

    name = served_model_name or checkpoint.rstrip("/").rsplit("/", 1)[-1]
    started = time.perf_counter()
    generator = Generator.from_checkpoint(checkpoint, max_model_len, device)
    counts = ", ".join(f"{k}={v}" for k, v in generator.model.schemes.items())
    print(f"requant serve: loaded {name} ({counts} linear modules) on {device} in {time.perf_counter() - started:.1f}s; "
          f"http://{host}:{port}/v1", flush=True)
    app = create_app(generator, name, api_key, max_body_bytes, max_pending, body_timeout_s)
    # No uvicorn limit_concurrency: it answers 503 to every new connection, health checks included, once
    # that many are open, so stalled clients could starve the server. Work is bounded by max_pending (429)
    # and stalled bodies by BodyLimit's timeout (408).
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
