"""The reference server under load and abuse on loopback: concurrent clients, oversized and slow bodies,
malformed JSON, invalid UTF-8, huge max_tokens, many stop strings, missing API key. Health must keep
answering, every bad request must get a 4xx, memory must stay bounded."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import psutil
import pytest
from hardening_support import scale

import requant
from requant.engines.engines import launch, load_engines

KEY = "hardening-key-5d1e"


@pytest.fixture(scope="module")
def server(tiny_upstream, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("abuse") / "mx"
    requant.convert(str(tiny_upstream), str(ckpt), "kimi-k2.6-mxfp4", progress=False)
    engine = launch(load_engines()["reference"], str(ckpt), served_model_name="mx", api_key=KEY,
                    log_dir=tmp_path_factory.mktemp("abuse-logs"), max_model_len=1024, extra_args=("--body-timeout", "2"))
    yield engine
    engine.stop()


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _health_ok(base: str) -> bool:
    return httpx.get(f"{base}/health", timeout=10).status_code == 200


BAD = [
    (b"{not json", 400), (b"\xff\xfe\xfa invalid utf-8", 400), (b'{"prompt": "\xff\xfe"}', 400),
    (json.dumps({"model": "mx"}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": "x", "max_tokens": 10 ** 12}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": "x", "max_tokens": -1}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": "x", "stop": ["s"] * 10_000}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": "x", "stop": ["long" * 1000]}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": "x", "n": 10 ** 6}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": ["x"] * 10_000}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": "word " * 5000}).encode(), 400),
    (json.dumps({"model": "other", "prompt": "x"}).encode(), 404),
    (b"x" * (5 << 20), 413),
    (json.dumps({"model": "mx", "prompt": "x", "temperature": "hot"}).encode(), 400),
    (json.dumps({"model": "mx", "prompt": "x", "logprobs": 10 ** 9}).encode(), 400),
    (json.dumps([{"model": "mx"}] * 1000).encode(), 400),
]


def test_bad_requests_all_get_4xx(server, ledger):
    base = server.base_url
    for body, status in BAD * scale(1, 5):
        r = httpx.post(f"{base}/v1/completions", content=body, headers={**_auth(), "content-type": "application/json"},
                       timeout=60)
        assert r.status_code == status, (body[:80], r.status_code, r.text[:200])
        assert "error" in r.json()
        ledger.record("server: bad requests", f"HTTP {r.status_code}")
    assert _health_ok(base)


def test_api_key_is_enforced(server, ledger):
    url = f"{server.base_url}/v1/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(url, json={"model": "mx", "prompt": "x", "max_tokens": 1}, headers=headers, timeout=30)
        assert r.status_code == 401 and KEY not in r.text
        ledger.record("server: requests without the API key", "HTTP 401")


def test_slow_clients_do_not_block_health(server, ledger):
    """Connections that send headers (or half a body) and then stall must not starve other clients."""
    host, port = urlparse(server.base_url).hostname, urlparse(server.base_url).port
    socks = []
    for i in range(scale(100, 300)):
        s = socket.create_connection((host, port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n" +
                  (b"\r\n{\"prompt\": " if i % 2 else b""))
        socks.append(s)
    try:
        started = time.perf_counter()
        assert _health_ok(server.base_url)
        ok = httpx.post(f"{server.base_url}/v1/completions", headers=_auth(), timeout=60,
                        json={"model": "mx", "prompt": "hello", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200
        ledger.record("server: slow clients", f"{len(socks)} stalled connections, health answered")
        ledger.note("server: slow clients", f"health + a completion answered in {time.perf_counter() - started:.2f} s "
                                            f"with {len(socks)} stalled connections open")
    finally:
        for s in socks:
            s.close()


def test_stalled_body_gets_408(server, ledger):
    host, port = urlparse(server.base_url).hostname, urlparse(server.base_url).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nAuthorization: Bearer "
                  + KEY.encode() + b"\r\n\r\n{\"prompt\"")
        reply = b""
        while b"stalled" not in reply:              # headers and body may arrive in separate segments
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply
    ledger.record("server: bad requests", "HTTP 408")


def test_concurrent_load_latency_and_memory(server, ledger):
    proc = psutil.Process(server.process.pid)
    rss_before = proc.memory_info().rss
    peak = [rss_before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.05)

    def one(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        r = httpx.post(f"{server.base_url}/v1/completions", headers=_auth(), timeout=300,
                       json={"model": "mx", "prompt": f"Question: {i} apples?\nAnswer:", "max_tokens": 8,
                             "temperature": 0, "stop": ["\n"] * 16})
        return r.status_code, time.perf_counter() - t0

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    total = scale(64, 400)
    health = []
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(one, i) for i in range(total)]
        while not all(f.done() for f in futures):
            t0 = time.perf_counter()
            assert _health_ok(server.base_url)
            health.append(time.perf_counter() - t0)
            time.sleep(0.2)
        results = [f.result() for f in futures]
    stop.set()
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429}                      # 429 = over max-pending: bounded, not an error
    assert codes.count(200) >= total // 4
    latencies = sorted(t for c, t in results if c == 200)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    for code in codes:
        ledger.record("server: concurrent completions", f"HTTP {code}")
    growth = (peak[0] - rss_before) / 2 ** 20
    ledger.note("server: concurrent completions",
                f"{total} requests from 32 clients: p50 {p50:.2f} s, p99 {p99:.2f} s; health p99 "
                f"{sorted(health)[int(0.99 * (len(health) - 1))]:.3f} s; server RSS {rss_before / 2 ** 20:.0f} MB, "
                f"peak +{growth:.0f} MB")
    assert growth < 512, f"server RSS grew by {growth:.0f} MB under load"
