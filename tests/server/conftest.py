"""Fixtures for the server tests: a tiny random model, the real engine behind a real uvicorn
server on a free loopback port (in a background thread), and clients for it."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from tests.model_factory import make_tiny_model

# The server needs fastapi/uvicorn/openai (installed by the test extras); machines without them
# (the GPU image) skip these tests instead of failing at collection.
if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai", "httpx")):
    collect_ignore_glob = ["test_*.py"]

API_KEY = "sk-test-anybit"
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 128
ENGINE_OPTIONS = dict(max_model_len=MAX_MODEL_LEN, device="cpu", dtype="float32", max_num_seqs=256,
                      max_num_batched_tokens=2048, kv_cache_memory=32 * 1024 * 1024)


@dataclass
class RunningServer:
    base_url: str
    port: int
    app: Any
    async_engine: Any
    server: Any
    thread: threading.Thread

    def openai(self, api_key: str = API_KEY, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def async_openai(self, api_key: str = API_KEY, **kw):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0,
                                  timeout=kw.pop("timeout", 120), **kw)

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Wait until no request is active and every KV block is free again; return the stats."""
        deadline = time.monotonic() + timeout
        stats = self.async_engine.stats()
        while time.monotonic() < deadline:
            stats = self.async_engine.stats()
            if (self.async_engine.num_active() == 0 and stats.get("num_running", 0) == 0
                    and stats.get("num_waiting", 0) == 0
                    and stats.get("num_free_blocks") == stats.get("num_total_blocks")):
                return stats
            time.sleep(0.05)
        return stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine, api_key: str | None = API_KEY, asgi_spec: str | None = None, **kw) -> RunningServer:
    """Serve ``engine`` on a free loopback port; ``asgi_spec`` overrides the ASGI spec version
    uvicorn reports for HTTP (Starlette changes how it notices disconnects at "2.4")."""
    import uvicorn

    from anybit.server.cli import build_server

    app, async_engine = build_server(engine, [MODEL_NAME, "tiny"], api_key=api_key, **kw)
    served = app
    if asgi_spec is not None:
        async def served(scope, receive, send):
            if scope["type"] == "http":
                scope = {**scope, "asgi": {"version": "3.0", "spec_version": asgi_spec}}
            await app(scope, receive, send)
    port = free_port()
    config = uvicorn.Config(served, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", port, app, async_engine, server, thread)


def stop_server(srv: RunningServer) -> None:
    srv.server.should_exit = True
    srv.thread.join(15)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=0)


def make_engine(model_path: str, **overrides):
    from anybit.config import EngineConfig
    from anybit.engine import LLMEngine

    options = dict(ENGINE_OPTIONS)
    options.update(overrides)
    return LLMEngine.from_config(EngineConfig.create(model_path, **options), progress=False)


@pytest.fixture(scope="session")
def server(model_path):
    srv = start_server(make_engine(model_path))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server):
    c = server.openai()
    yield c
    with contextlib.suppress(Exception):
        c.close()


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as c:
        yield c
