"""The server's engine thread with async scheduling on (CPU): concurrent streams give the texts
the synchronous server gives, and a client that leaves mid-stream has its blocks freed."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, make_engine, start_server, stop_server


@pytest.fixture(scope="module")
def async_server(model_path):
    srv = start_server(make_engine(model_path, async_scheduling=True))
    yield srv
    stop_server(srv)


async def _stream_all(srv, num: int) -> list[tuple[str, str]]:
    async with srv.async_openai(timeout=100) as c:
        async def one(i: int):
            extra = {"seed": i, "temperature": 0.8} if i % 2 else {"temperature": 0.0}
            stream = await c.completions.create(model=MODEL_NAME, prompt=f"prompt number {i}",
                                                max_tokens=3 + i % 7, stream=True, **extra)
            text, finish = "", None
            async for ch in stream:
                if ch.choices:
                    text += ch.choices[0].text
                    finish = ch.choices[0].finish_reason or finish
            return text, finish

        return await asyncio.gather(*(one(i) for i in range(num)))


@pytest.mark.timeout(120)
def test_async_server_streams_match_sync_server(server, async_server):
    assert async_server.async_engine.engine.core.async_scheduling
    assert not server.async_engine.engine.core.async_scheduling
    want = asyncio.run(asyncio.wait_for(_stream_all(server, 24), 100))
    got = asyncio.run(asyncio.wait_for(_stream_all(async_server, 24), 100))
    assert got == want
    assert async_server.async_engine.engine.core.num_overlapped_steps > 0
    stats = async_server.wait_idle()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats


@pytest.mark.timeout(60)
def test_async_server_disconnect_frees_blocks(async_server):
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "n": 2, "max_tokens": 100, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(base_url=async_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=30) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                seen += 1
                if seen == 3:
                    break
    stats = async_server.wait_idle()
    assert async_server.async_engine.num_active() == 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
