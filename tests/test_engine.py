"""Engine behaviour on a tiny model (CPU): preemption, seeds, n > 1, stop strings, logprobs,
streaming, aborts, prompt logprobs, and that every KV block returns to the pool."""

from __future__ import annotations

import math

import pytest
import torch

from anybit import LLM, SamplingParams
from anybit.llm import OFFLINE_MAX_NUM_BATCHED_TOKENS
from tests.model_factory import make_tiny_model

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "héllo 日本語", "import os\nimport sys\n",
           "Paged attention stores keys", "for i in range(10):"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("engine_llama"), arch="llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", device="cpu", block_size=8, progress=False)


def pool_full(llm: LLM) -> bool:
    return llm.engine.scheduler.kv.pool.check_all_free() and not llm.engine.has_unfinished_requests()


def test_tiny_cache_forces_preemption_and_output_is_unchanged(model_dir, llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    # 12 blocks of 8 tokens cannot hold 6 sequences of ~35 tokens at once
    small = LLM(model_dir, dtype="float32", device="cpu", block_size=8, progress=False,
                kv_cache_memory=12 * 2 * 2 * 8 * 2 * 16 * 4)
    assert small.engine.runner.num_blocks == 12
    got = [o.outputs[0].token_ids for o in small.generate(PROMPTS, params)]
    assert got == want
    assert small.engine.scheduler.num_preemptions > 0
    assert pool_full(small)


def test_seed_gives_same_output_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids
    mixed = [SamplingParams(temperature=0.8, max_tokens=10)] * 3 + [params]
    batch = llm.generate(PROMPTS[1:4] + PROMPTS[:1], mixed)
    assert batch[3].outputs[0].token_ids == alone
    other = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=99))
    assert other[0].outputs[0].token_ids != alone  # with a 384-token vocab a collision is negligible


def test_n_completions_share_prompt_blocks(llm):
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert pool_full(llm)


def test_stop_string_is_not_leaked(llm):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    full = llm.generate(PROMPTS[0], params)[0].outputs[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                 stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:full.index(stop)]
    assert stop not in out.text
    assert pool_full(llm)


def test_stop_token_ids_and_eos(llm):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    toks = llm.generate(PROMPTS[2], params)[0].outputs[0].token_ids
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                  stop_token_ids=[toks[4]]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == toks[4]
    assert out.token_ids == toks[:toks.index(toks[4]) + 1]


def test_logprobs_are_consistent(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and len(lp) >= 3
        assert lp[tok] == pytest.approx(max(lp.values()))  # greedy: the sampled token is the top one
        assert sum(math.exp(v) for v in lp.values()) <= 1.0 + 1e-4
    assert out.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs)))


def test_prompt_logprobs_match_a_full_forward(llm):
    prompt = "The quick brown fox jumps over the lazy dog"
    out = llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    ids = out.prompt_token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    # the logprob of token j under the model equals a manual forward's log_softmax at j-1
    from tests.test_model_correctness import prefill_logits

    logits = prefill_logits(llm, [ids])[0]
    lps = torch.log_softmax(logits.float(), dim=-1)
    for j in range(1, len(ids)):
        assert out.prompt_logprobs[j][ids[j]] == pytest.approx(lps[j - 1, ids[j]].item(), abs=1e-4)
    assert pool_full(llm)


def test_streaming_deltas_add_up(llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    final = llm.generate(PROMPTS[3], params)[0].outputs[0]
    text, ids = "", []
    for out in llm.generate_stream(PROMPTS[3], params):
        text += out.outputs[0].delta_text
        ids += out.outputs[0].delta_token_ids
    assert text == final.text and ids == final.token_ids
    assert pool_full(llm)


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("a")
    engine.abort_request("b")
    while engine.core.has_unfinished():
        engine.step()
    assert pool_full(llm)


def test_bad_requests(llm):
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(ValueError, match="not in the vocabulary"):
        llm.generate([[1, 2, 10**6]], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 600], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM("whatever", bogus_option=1)
    assert pool_full(llm)


@pytest.mark.parametrize("kv", ["float32", "int8", "int4"])
@pytest.mark.parametrize("window", [None, 5])
def test_batched_torch_decode_matches_reference(kv, window):
    from anybit.kernels.attention_decode import ref_paged_attention_decode
    from anybit.kernels.kv_cache_ops import ref_reshape_and_cache
    from anybit.layers.attention import batched_decode
    from anybit.layers.attention_meta import LayerKVCache
    from anybit.models.arch import ArchConfig
    from anybit.runtime.kv_cache import allocate_kv_caches

    torch.manual_seed(0)
    arch = ArchConfig("LlamaForCausalLM", 10, 8, 8, 1, 8, 2, 16, 1e-6, 1e4, None, 64, False, False, False,
                      (None,), None, None, ())
    cache: LayerKVCache = allocate_kv_caches(arch, 16, 4, kv, torch.device("cpu"))[0]
    if cache.key_scale is not None:  # packed: a (page, kv head) holds its 2 or 4 arrays contiguously
        n = 2 if kv == "int8" else 4
        assert cache.key_scale.shape == (16, 4, 2) and cache.key_scale.stride() == (8 * n, 1, 4 * n)
        assert cache.value_scale.data_ptr() == cache.key_scale.data_ptr() + 4 * cache.key_scale.element_size()
    lens = [1, 7, 13]
    tables = torch.tensor([[3, 0, 0, 0], [5, 1, 0, 0], [2, 4, 6, 7]], dtype=torch.int32)
    for i, n in enumerate(lens):
        slots = torch.tensor([int(tables[i, p // 4]) * 4 + p % 4 for p in range(n)])
        ref_reshape_and_cache(torch.randn(n, 2, 16), torch.randn(n, 2, 16), cache, slots)
    q = torch.randn(3, 8, 16)
    want = ref_paged_attention_decode(q, cache, torch.tensor(lens, dtype=torch.int32), tables, 0.25, window,
                                      13)
    got = batched_decode(q, cache, tables, lens, 0.25, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_logprobs_with_chunked_prefill(model_dir, llm):
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    want = llm.generate(prompt, params)[0].prompt_logprobs
    chunked = LLM(model_dir, dtype="float32", device="cpu", block_size=8, progress=False,
                  max_num_batched_tokens=8)
    got = chunked.generate(prompt, params)[0].prompt_logprobs
    # the offline API's own budget applies only where the caller gives none
    assert chunked.config.scheduler.max_num_batched_tokens == 8
    assert llm.config.scheduler.max_num_batched_tokens == OFFLINE_MAX_NUM_BATCHED_TOKENS
    assert len(got) == len(want) and got[0] is None
    for a, b in zip(got[1:], want[1:]):
        assert a.keys() == b.keys()
        assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-4)


def test_reset_prefix_cache_drops_hits_only_when_idle(llm):
    prompt = "A prompt long enough to fill a few KV blocks of eight tokens each, twice over."
    params = SamplingParams(max_tokens=2, temperature=0)
    first = llm.generate(prompt, params)[0]
    assert llm.generate(prompt, params)[0].num_cached_tokens > 0
    llm.engine.add_request("busy", prompt, params)
    assert not llm.reset_prefix_cache()  # a request in progress: nothing changes
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.reset_prefix_cache()
    again = llm.generate(prompt, params)[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
