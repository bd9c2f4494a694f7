"""Pieces of the server that need no engine: request parsing, error bodies, SSE framing, names."""

from __future__ import annotations

import pytest

from anybit.server.cli import model_names
from anybit.server.errors import OpenAIError, from_value_error
from anybit.server.protocol import ChatCompletionRequest, CompletionRequest
from anybit.server.serving import parse_body, sse


def test_strict_parsing_and_defaults():
    req = parse_body(CompletionRequest, b'{"prompt": "hi", "temperature": 1, "unknown_field": 3}')
    assert req.prompts() == ["hi"] and req.max_tokens == 16 and req.temperature == 1.0
    assert parse_body(CompletionRequest, b'{"prompt": [1, 2, 3]}').prompts() == [[1, 2, 3]]
    assert parse_body(CompletionRequest, b'{"prompt": [[1], [2, 3]]}').prompts() == [[1], [2, 3]]
    body = (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, '
            b'{"type": "text", "text": "b"}]}], "max_completion_tokens": 5, "stop": "x"}')
    chat = parse_body(ChatCompletionRequest, body)
    assert chat.plain_messages() == [{"role": "user", "content": "ab"}]
    assert chat.requested_max_tokens == 5
    assert chat.common_sampling_kwargs()["stop"] == ["x"]


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": "hi", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "hi", "n": 2.0}', "n"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": 1}', "logprobs"),
    (b'{"prompt": "hi", "stream_options": {"include_usage": true}}', "stream_options"),
])
def test_errors_name_the_field(body, param):
    model = ChatCompletionRequest if b"messages" in body else CompletionRequest
    with pytest.raises(OpenAIError) as exc:
        parse_body(model, body)
    assert exc.value.status == 400 and exc.value.param == param
    assert exc.value.err_type == "invalid_request_error"


def test_value_error_prefix_becomes_param():
    err = from_value_error(ValueError("temperature: -1.0 is out of range, allowed numbers >= 0"))
    assert err.param == "temperature" and err.status == 400
    assert from_value_error(ValueError("something odd")).param is None


def test_error_response_body():
    resp = OpenAIError("nope", status=401, code="invalid_api_key").response()
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert b'"type":"authentication_error"' in resp.body


def test_sse_framing():
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()


def test_model_names():
    assert model_names("/models/tiny-llama/", None) == ["/models/tiny-llama/", "tiny-llama"]
    assert model_names("x", ["served"]) == ["served"]


def test_serve_arguments_default_to_loopback():
    import argparse

    from anybit.server.cli import add_chat_arguments, add_serve_arguments

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    args = p.parse_args([])
    assert args.host == "127.0.0.1" and args.api_key is None and args.max_request_body_bytes > 0
    c = argparse.ArgumentParser()
    add_chat_arguments(c)
    assert c.parse_args(["--max-tokens", "7"]).max_tokens == 7
