"""OpenAI API over real HTTP (uvicorn on loopback, official ``openai`` client, real engine on a
tiny random Llama): completions and chat, streamed and not, n > 1, logprobs, stop strings,
echo / prompt scoring, and equality with the offline API for a fixed seed."""

from __future__ import annotations

import math

import pytest

from tests.server.conftest import ENGINE_OPTIONS, MODEL_NAME

pytestmark = pytest.mark.timeout(120)

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]


def test_models_health_metrics(server, client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert http.get("/health").json() == {"status": "ok"}
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2)
    text = http.get("/metrics").text
    for name in ("anybit_http_requests_total", "anybit_num_requests_waiting",
                 "anybit_num_requests_running", "anybit_kv_cache_usage_ratio", "anybit_prompt_tokens_total",
                 "anybit_generation_tokens_total", "anybit_time_to_first_token_seconds_bucket",
                 "anybit_inter_token_latency_seconds_bucket", "anybit_request_finished_total"):
        assert name in text, name


def test_completion_non_stream(server, client):
    tok = server.async_engine.tokenizer
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL_NAME
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason == "length" and c.index == 0
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_completion_stream_equals_non_stream(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_stream_equals_non_stream(server, client):
    kw = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, temperature=0)
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    tok = server.async_engine.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert r.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == msg.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n_greater_than_one(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 18
    streamed: dict[int, str] = {}
    for ch in client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0,
                                        seed=7, stream=True):
        for c in ch.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in r.choices}
    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, n=2,
                                          temperature=1.0)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_batch_of_prompts_orders_choices(client):
    r = client.completions.create(model=MODEL_NAME, prompt=["Hello", "import os"], max_tokens=3, n=2,
                                  temperature=0)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy: same per prompt


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5)  # greedy picks the argmax


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob


def test_stop_string(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 6
    stop = full[3:5]
    expected = full[:full.index(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == expected


def test_echo_and_prompt_scoring(server, client):
    tok = server.async_engine.tokenizer
    n_prompt = len(tok.encode(PROMPT))
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT
    assert len(c.logprobs.token_logprobs) == n_prompt
    assert c.logprobs.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in c.logprobs.token_logprobs[1:])
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == n_prompt
    r2 = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                                   temperature=0, extra_body={"ignore_eos": True})
    c2 = r2.choices[0]
    assert c2.text.startswith(PROMPT) and len(c2.logprobs.tokens) == n_prompt + 3
    assert c2.logprobs.token_logprobs[1:n_prompt] == c.logprobs.token_logprobs[1:]


def test_token_id_prompt(server, client):
    ids = server.async_engine.tokenizer.encode(PROMPT)
    a = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0)
    b = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    assert a.choices[0].text == b.choices[0].text


@pytest.fixture(scope="module")
def offline_llm(model_path):
    from anybit import LLM

    return LLM(model_path, progress=False, **ENGINE_OPTIONS)


def test_seeded_output_equals_offline_api(server, client, offline_llm):
    from anybit import SamplingParams

    llm = offline_llm
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, n=2)
    offline = llm.generate([PROMPT], params)[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0.9, top_p=0.95, seed=1234,
                                  max_tokens=12, n=2, extra_body={"top_k": 50})
    assert {c.index: c.text for c in r.choices} == {c.index: c.text for c in offline.outputs}

    tok = llm.tokenizer
    chat_ids = tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    chat_params = SamplingParams(temperature=0.7, seed=99, max_tokens=10)
    offline_chat = llm.generate([chat_ids], chat_params)[0].outputs[0].text
    rc = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0.7, seed=99,
                                        max_tokens=10)
    assert rc.choices[0].message.content == offline_chat


def test_streamed_echo_scoring_matches_non_stream(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    full = client.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in client.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(c.text for c in chunks) == full.text == PROMPT
    assert chunks[-1].finish_reason == "length"
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
    assert tokens == full.logprobs.token_logprobs


def test_chat_max_completion_tokens_and_stop_token_ids(client, offline_llm):
    from anybit import SamplingParams

    r = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=3,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    greedy = offline_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    ids = greedy[0].outputs[0].token_ids
    r2 = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                   extra_body={"stop_token_ids": [ids[2]], "ignore_eos": True})
    assert r2.choices[0].finish_reason == "stop"
    assert r2.usage.completion_tokens == ids.index(ids[2]) + 1
