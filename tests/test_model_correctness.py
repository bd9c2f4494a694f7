"""Logits and greedy generations match transformers (float32, CPU) for Llama/Mistral/Qwen2."""

from __future__ import annotations

import pytest
import torch

from anybit import LLM, SamplingParams
from anybit.core.outputs import ScheduledSeq
from tests.model_factory import make_tiny_model

transformers = pytest.importorskip("transformers")

ARCHS = {
    "llama_gqa_llama3rope": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "rope_scaling": None}),
    "mistral_window": ("mistral", {}),
    "qwen2_bias_tied": ("qwen2", {}),
    "qwen2_untied": ("qwen2", {"tie_word_embeddings": False}),
}

PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values",
    "héllo 日本語",
    "import os\nimport sys\nprint('hello world')\nfor i in range(10):\n    total += i * i\n",
]
GEN_TOKENS = 32


@pytest.fixture(scope="module", params=list(ARCHS))
def model_dir(request, tmp_path_factory):
    arch, overrides = ARCHS[request.param]
    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=arch, **overrides)


def hf_model(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def make_llm(path, **kw):
    kw.setdefault("block_size", 8)
    return LLM(path, dtype="float32", device="cpu", progress=False, **kw)


def prefill_logits(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All-position logits of a batch of prompts in one varlen step through the paged cache."""
    runner = llm.engine.runner
    bs = runner.block_size
    seqs, next_block = [], 0
    for i, ids in enumerate(prompts):
        nb = -(-len(ids) // bs)
        blocks = list(range(next_block, next_block + nb))
        next_block += nb
        seqs.append(ScheduledSeq(str(i), ids, 0, blocks, False, SamplingParams(), None, ids, [], False,
                                 len(ids)))
    input_ids, positions, meta = runner.prepare(seqs)
    with torch.inference_mode():
        hidden = runner.model(input_ids, positions, runner.kv_caches, meta)
        logits = runner.model.compute_logits(hidden)
    return list(logits.split([len(p) for p in prompts]))


def test_logits_match_transformers(model_dir):
    llm = make_llm(model_dir)
    ref = hf_model(model_dir)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    ours = prefill_logits(llm, ids)
    for prompt_ids, got in zip(ids, ours):
        with torch.no_grad():
            want = ref(torch.tensor([prompt_ids])).logits[0]
        scale = want.abs().max().item()
        diff = (got - want).abs().max().item()
        assert diff <= 1e-4 * scale, f"max |diff| {diff} vs scale {scale}"


def hf_greedy(ref, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                           do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


GREEDY = SamplingParams(temperature=0.0, max_tokens=GEN_TOKENS, min_tokens=GEN_TOKENS)


def test_greedy_matches_transformers_alone_batched_chunked_and_cached(model_dir):
    ref = hf_model(model_dir)
    llm = make_llm(model_dir)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    want = [hf_greedy(ref, p) for p in ids]
    # alone
    alone = llm.generate(PROMPTS[0], GREEDY)[0]
    assert alone.outputs[0].token_ids == want[0]
    assert alone.outputs[0].finish_reason == "length"
    # batched, prompts of different lengths
    batched = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in batched] == want
    # the second run of the same prompts hits the prefix cache
    again = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in again] == want
    assert any(o.num_cached_tokens > 0 for o in again)
    assert llm.engine.scheduler.kv.pool.check_all_free()
    # chunked prefill: at most 8 tokens per step, mixed with decodes
    chunked = make_llm(model_dir, max_num_batched_tokens=8, enable_prefix_caching=False)
    out = chunked.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in out] == want
    assert chunked.engine.scheduler.kv.pool.check_all_free()


def test_text_matches_token_ids(model_dir):
    llm = make_llm(model_dir)
    out = llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]
    assert out.text == llm.tokenizer.decode(out.token_ids)
