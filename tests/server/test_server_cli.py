"""``anybit serve`` shutdown and ``anybit chat``: SIGTERM drains (new requests 503, running ones
finish, then exit 0); the drain timeout aborts what is left; the terminal chat streams replies,
keeps history and quits on /exit, reading from a pipe."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, free_port, make_engine, start_server, stop_server

REPO = Path(__file__).resolve().parents[2]
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.timeout(90)
def test_sigterm_drains_then_exits(model_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "anybit.cli", "serve", model_path, "--port", str(port),
                             "--shutdown-timeout", "30", "--log-level", "warning", *ENGINE_FLAGS],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

        result: dict = {}
        first_chunk = threading.Event()

        def stream():
            body = {"prompt": "The quick brown fox", "max_tokens": 110, "ignore_eos": True, "stream": True}
            chunks = []
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append(json.loads(line[6:]))
                        first_chunk.set()
            result["chunks"] = chunks

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        refused = None
        if t.is_alive():  # still streaming: the server must refuse new work now
            r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
            refused = r.status_code
            assert r.status_code == 503, r.text
        t.join(60)
        print(f"stream alive after SIGTERM: {refused is not None}")
        finishes = [c["choices"][0]["finish_reason"] for c in result["chunks"] if c.get("choices")]
        assert finishes[-1] == "length"  # the running request finished normally
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_drain_timeout_aborts_running_requests(model_path):
    srv = start_server(make_engine(model_path), api_key=None)
    try:
        got: dict = {}
        started = threading.Event()

        def stream():
            body = {"prompt": "The quick brown fox", "max_tokens": 110, "ignore_eos": True, "stream": True}
            lines = []
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
                        started.set()
            got["lines"] = lines

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(30)
        aborted = asyncio.run(srv.async_engine.drain(0.0))
        t.join(30)
        assert aborted == 1
        lines = got["lines"]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["type"] == "service_unavailable"
        stats = srv.wait_idle()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
    finally:
        stop_server(srv)


@pytest.mark.timeout(60)
def test_terminal_chat_keeps_history(model_path):
    from anybit.sampling_params import SamplingParams
    from anybit.server.terminal_chat import TerminalChat

    engine = make_engine(model_path)
    out = io.StringIO()
    chat = TerminalChat(engine, SamplingParams(max_tokens=6, temperature=0), stdin=io.StringIO(
        "hello there\n\nhow are you\n/exit\nnever read\n"), stdout=out)
    assert chat.run() == 0
    roles = [m["role"] for m in chat.history]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert chat.history[2]["content"] == "how are you"
    text = out.getvalue()
    assert chat.history[1]["content"] in text and chat.history[3]["content"] in text
    assert "never read" not in text


@pytest.mark.timeout(90)
def test_chat_command_reads_a_pipe(model_path):
    proc = subprocess.run([sys.executable, "-m", "anybit.cli", "chat", model_path, "--max-tokens", "5",
                           "--temperature", "0", *ENGINE_FLAGS], input="hi\nwho are you\n/exit\n",
                          env=_env(), capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 1


@pytest.mark.timeout(60)
def test_server_exits_when_the_engine_dies(model_path):
    import uvicorn

    from anybit.server.cli import GracefulServer, build_server

    app, async_engine = build_server(make_engine(model_path), ["m"])
    port = free_port()
    server = GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
                            async_engine, 1.0)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    async_engine.error = RuntimeError("simulated engine failure")
    t.join(15)
    assert not t.is_alive() and server.engine_failed
