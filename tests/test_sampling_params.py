"""SamplingParams validation: defaults, normalization and one error per bad field."""

import pytest

from anybit.sampling_params import SamplingParams


def test_defaults():
    p = SamplingParams()
    assert p.n == 1 and p.temperature == 1.0 and p.top_p == 1.0 and p.top_k == 0
    assert p.max_tokens == 16 and p.min_tokens == 0 and p.stop == [] and p.stop_token_ids == []
    assert p.logprobs is None and p.prompt_logprobs is None and p.skip_special_tokens
    assert not p.is_greedy and not p.uses_penalties and not p.uses_top_k


def test_normalization():
    p = SamplingParams(stop="###", stop_token_ids=(3, 4), temperature=0, max_tokens=None, top_k=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [3, 4]
    assert isinstance(p.temperature, float) and p.is_greedy and not p.uses_top_k
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-4).is_greedy
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop=["a", "a", "b"]).stop == ["a", "b"]
    assert SamplingParams(seed=5, n=3).child_seed(2) == 7
    assert SamplingParams().child_seed(1) is None
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(logprobs=0).logprobs == 0
    q = SamplingParams(top_p=0.5).clone(top_k=3)
    assert q.top_k == 3 and q.top_p == 0.5 and q.uses_top_p


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.5}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": False}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"seed": 1.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"stop": 3}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"stop_token_ids": 3}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"prompt_logprobs": 30}, "prompt_logprobs"),
        ({"skip_special_tokens": "yes"}, "skip_special_tokens"),
        ({"include_stop_str_in_output": None}, "include_stop_str_in_output"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"{field}:"), msg
    assert "allowed" in msg, msg
