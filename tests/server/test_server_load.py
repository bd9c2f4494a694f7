"""Load and disconnects over real HTTP: 200 concurrent streaming requests all complete and the KV
pool is full again afterwards; a client that goes away mid-stream (or mid-request) has its request
aborted and its blocks freed."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, make_engine, start_server, stop_server

NUM_CONCURRENT = 200


def _aborted(http) -> float:
    text = http.get("/metrics").text
    m = re.search(r'anybit_request_finished_total\{finish_reason="abort"\} ([0-9.]+)', text)
    return float(m.group(1)) if m else 0.0


@pytest.mark.timeout(180)
def test_200_concurrent_streams_complete_and_free_kv(server):
    async def run():
        async with server.async_openai(timeout=150) as c:
            async def one(i: int):
                if i % 2:
                    stream = await c.chat.completions.create(
                        model=MODEL_NAME, messages=[{"role": "user", "content": f"request {i}"}],
                        max_tokens=4, temperature=0.8, seed=i, stream=True)
                    text, finish = "", None
                    async for ch in stream:
                        if ch.choices:
                            text += ch.choices[0].delta.content or ""
                            finish = ch.choices[0].finish_reason or finish
                else:
                    stream = await c.completions.create(model=MODEL_NAME, prompt=f"prompt number {i}",
                                                        max_tokens=4, temperature=0.8, seed=i, stream=True)
                    text, finish = "", None
                    async for ch in stream:
                        if ch.choices:
                            text += ch.choices[0].text
                            finish = ch.choices[0].finish_reason or finish
                return finish

            return await asyncio.gather(*(one(i) for i in range(NUM_CONCURRENT)))

    t0 = time.monotonic()
    finishes = asyncio.run(asyncio.wait_for(run(), 160))
    elapsed = time.monotonic() - t0
    assert len(finishes) == NUM_CONCURRENT
    assert all(f in ("length", "stop") for f in finishes), finishes
    stats = server.wait_idle()
    assert stats["num_total_blocks"] > 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
    print(f"{NUM_CONCURRENT} streams in {elapsed:.1f} s")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prompt,n", [("The quick brown fox", 1), (["The quick brown fox", "import os"], 2)])
def test_disconnect_mid_stream_aborts_and_frees(server, http, prompt, n):
    before = _aborted(http)
    body = {"model": MODEL_NAME, "prompt": prompt, "n": n, "max_tokens": 100, "stream": True,
            "ignore_eos": True, "temperature": 0}
    num_requests = len(prompt) if isinstance(prompt, list) else 1
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                seen += 1
                if seen == 3:
                    break  # leave: closing the response drops the connection
    stats = server.wait_idle()
    assert server.async_engine.num_active() == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert _aborted(http) == before + num_requests


@pytest.mark.timeout(60)
def test_disconnect_while_waiting_for_non_stream_response(server, http):
    """A raw socket sends a long non-streaming request and closes as soon as it is running."""
    before = _aborted(http)
    body = json.dumps({"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 110,
                       "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 10
        while server.async_engine.num_active() == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert server.async_engine.num_active() == 1
    stats = server.wait_idle()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    deadline = time.monotonic() + 10
    while _aborted(http) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted(http) == before + 1


@pytest.mark.timeout(60)
def test_disconnect_is_noticed_with_asgi_spec_2_4(model_path):
    """Starlette stops listening for disconnects at ASGI spec 2.4; the server must not rely on it."""
    srv = start_server(make_engine(model_path), api_key=None, asgi_spec="2.4")
    try:
        body = {"prompt": "The quick brown fox", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=30) as r:
            for i, _ in enumerate(line for line in r.iter_lines() if line.startswith("data: ")):
                if i == 2:
                    break
        stats = srv.wait_idle()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        text = httpx.get(srv.base_url + "/metrics").text
        assert 'anybit_request_finished_total{finish_reason="abort"} 1.0' in text
    finally:
        stop_server(srv)
