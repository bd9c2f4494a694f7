"""Bad input over real HTTP: every malformed request gets a 400 with an OpenAI error body naming
the offending parameter, while the server keeps serving; API key (401), body limit (413),
queue bound (503)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, make_engine, start_server, stop_server

pytestmark = pytest.mark.timeout(120)

C = "/v1/completions"
CH = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG = "fox " * (MAX_MODEL_LEN * 2)

# (route, body, expected "param")
BAD = [
    (C, {"model": "nope", "prompt": "hi"}, "model"),
    (CH, {"model": "gpt-4", "messages": MSG}, "model"),
    (C, {"prompt": ""}, "prompt"),
    (C, {"prompt": []}, "prompt"),
    (C, {}, "prompt"),
    (C, {"prompt": 5}, "prompt"),
    (C, {"prompt": LONG}, "prompt"),
    (C, {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": "10"}, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (C, {"prompt": "hi", "temperature": -0.5}, "temperature"),
    (C, {"prompt": "hi", "temperature": 3}, "temperature"),
    (C, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, "top_p"),
    (C, {"prompt": "hi", "top_p": 1.5}, "top_p"),
    (C, {"prompt": "hi", "top_k": -2}, "top_k"),
    (C, {"prompt": "hi", "min_p": 2}, "min_p"),
    (C, {"prompt": "hi", "presence_penalty": 5}, "presence_penalty"),
    (C, {"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    (C, {"prompt": "hi", "n": 0}, "n"),
    (C, {"prompt": "hi", "n": 1000}, "n"),
    (C, {"prompt": "hi", "n": True}, "n"),
    (C, {"prompt": "hi", "logprobs": 50}, "logprobs"),
    (C, {"prompt": "hi", "logprobs": -1}, "logprobs"),
    (C, {"prompt": "hi", "stream": "yes"}, "stream"),
    (C, {"prompt": "hi", "stop": 3}, "stop"),
    (C, {"prompt": "hi", "stop": [""]}, "stop"),
    (C, {"prompt": "hi", "seed": "abc"}, "seed"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {"prompt": "hi", "min_tokens": 10, "max_tokens": 2}, "min_tokens"),
    (C, {"prompt": [10**9]}, "prompt"),
    (C, {"prompt": "hi", "echo": 1}, "echo"),
    (C, {"prompt": "hi", "suffix": "tail"}, "suffix"),
    (C, {"prompt": ["a"] * 300}, "prompt"),
    (CH, {"messages": []}, "messages"),
    (CH, {}, "messages"),
    (CH, {"messages": "hi"}, "messages"),
    (CH, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CH, {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (CH, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CH, {"messages": MSG, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    (CH, {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (CH, {"messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CH, {"messages": MSG, "max_tokens": MAX_MODEL_LEN * 4}, "max_tokens"),
    (CH, {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    (CH, {"messages": MSG, "temperature": None, "top_p": -1}, "top_p"),
    (CH, {"messages": MSG, "tools": [{"type": "function"}]}, "tools"),
]


def test_at_least_thirty_cases():
    assert len(BAD) >= 30


@pytest.mark.parametrize("route,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_malformed_request_gets_400(http, route, body, param):
    r = http.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    assert "code" in err


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"null", b'{"prompt": "hi",}'])
def test_broken_json_gets_400(http, raw):
    r = http.post(C, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_server_still_serves_after_bad_requests(http, client):
    for route, body, _ in BAD[:10]:
        assert http.post(route, json=body).status_code == 400
    r = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=3)
    assert len(r.choices) == 1
    assert http.get("/health").status_code == 200


def test_bad_requests_during_a_stream_leave_it_intact(server, http):
    """Malformed requests fired while a stream is running: all 400, the stream finishes normally."""
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 60, "ignore_eos": True,
            "stream": True, "temperature": 0}
    texts, codes = [], []
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as c, c.stream("POST", C, json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            texts.append(chunk["choices"][0])
            if len(codes) < len(BAD):
                route, bad, _ = BAD[len(codes)]
                codes.append(http.post(route, json=bad).status_code)
    assert texts[-1]["finish_reason"] == "length"
    assert codes and set(codes) == {400}


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="unknown-model", prompt="hi", max_tokens=2)
    assert exc.value.status_code == 400
    assert exc.value.body["param"] == "model"


def test_api_key_required(server):
    for key in ("wrong-key", ""):
        c = server.openai(api_key=key or "x")
        if not key:
            c = server.openai(api_key="x", default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as exc:
            c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
        assert exc.value.status_code == 401
    for path in ("/v1/models", "/v1/chat/completions"):
        r = httpx.request("GET" if path.endswith("models") else "POST", server.base_url + path, json={})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/health").status_code == 200  # not a /v1 route


def test_body_too_large_gets_413(http):
    r = http.post(C, json={"prompt": "x" * (5 * 1024 * 1024)})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_chunked_body_too_large_gets_413(http):
    def chunks():
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    r = http.post(C, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_non_ascii_api_key_is_401_not_500(server):
    header = "Bearer k\xe9y".encode("latin-1")
    r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": header})
    assert r.status_code == 401


def test_unknown_route_gets_openai_error(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_bound_gives_503(model_path):
    """With one running sequence at a time and a bound of two waiting requests, a burst gets 503s."""
    srv = start_server(make_engine(model_path, max_num_seqs=1), max_waiting_requests=2)
    try:
        async def burst():
            async with srv.async_openai() as c:
                async def one():
                    try:
                        await c.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=16,
                                                   extra_body={"ignore_eos": True})
                        return 200
                    except openai.APIStatusError as e:
                        return e.status_code
                return await asyncio.gather(*(one() for _ in range(12)))

        codes = asyncio.run(asyncio.wait_for(burst(), 90))
        assert set(codes) <= {200, 503}
        assert codes.count(503) >= 1 and codes.count(200) >= 1
        stats = srv.wait_idle()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
    finally:
        stop_server(srv)


def test_draining_server_refuses_with_503(model_path):
    srv = start_server(make_engine(model_path), api_key=None)
    try:
        srv.async_engine.accepting = False
        r = httpx.post(srv.base_url + C, json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(srv.base_url + "/health").status_code == 503
        assert API_KEY  # server without a key accepts requests without Authorization
    finally:
        stop_server(srv)


def test_request_larger_than_the_kv_cache_is_refused(model_path):
    """A KV cache of 4 blocks (64 tokens) cannot hold 100+ tokens: a 400 naming max_tokens, streamed
    or not, and the engine keeps serving (it used to die on such a request)."""
    srv = start_server(make_engine(model_path, kv_cache_memory=4 * 8192), api_key=None)
    try:
        stats = srv.async_engine.stats()
        assert stats["num_total_blocks"] <= 8
        body = {"prompt": "The quick brown fox", "max_tokens": 100}
        for stream in (False, True):
            r = httpx.post(srv.base_url + C, json={**body, "stream": stream}, timeout=30)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "max_tokens"
        r = httpx.post(srv.base_url + CH, json={"messages": MSG}, timeout=30)  # no max_tokens: capped
        assert r.status_code == 200, r.text
        ok = httpx.post(srv.base_url + C, json={"prompt": "hi", "max_tokens": 4, "stream": True}, timeout=30)
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")
    finally:
        stop_server(srv)
