"""Sampler: greedy, seeded reproducibility, top-k/top-p/min-p masks, temperature statistics,
penalties, min_tokens and logprobs, on CPU with small hand-checkable distributions."""

from __future__ import annotations

import math

import pytest
import torch

from anybit.runtime.sampler import (
    Sampler,
    SamplingBatch,
    apply_top_k_top_p,
    compute_prompt_logprobs,
    make_generator,
)
from anybit.sampling_params import SamplingParams

P5 = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])


def build(params, logits_vocab, gens=None, prompts=None, outputs=None, eos=None):
    n = len(params)
    return SamplingBatch.build(params, gens or [None] * n, prompts or [[] for _ in range(n)],
                               outputs or [[] for _ in range(n)], logits_vocab, "cpu", eos_token_ids=eos)


def test_greedy_is_argmax_any_dtype():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(7, 50).to(dtype)
        before = logits.clone()
        p = SamplingParams(temperature=0.5, repetition_penalty=1.2, min_tokens=5, logprobs=3)
        out = Sampler()(logits, build([p] * 7, 40, outputs=[[1, 2]] * 7, eos={3}))
        assert out.sampled_token_ids.max() < 40 and out.top_logprob_ids.max() < 40
        assert torch.equal(logits, before)  # the caller's logits are not modified
        out = Sampler()(logits, build([SamplingParams(temperature=0)] * 7, 50))
        assert out.sampled_token_ids.dtype == torch.int64
        assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
        assert out.sampled_logprobs is None and out.top_logprobs is None
    # greedy rows mixed with random rows stay argmax; tiny temperature is greedy too
    logits = torch.randn(6, 40)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 2 + [
        SamplingParams(temperature=1e-6), SamplingParams(temperature=0.7, top_p=0.9)]
    out = Sampler()(logits, build(params, 40)).sampled_token_ids
    for r in (0, 2, 4):
        assert out[r] == logits[r].argmax()


def _run_seeded(seed_rows: dict[int, int], n_rows: int, steps: int, vocab: int = 64) -> dict[int, list[int]]:
    """Sample `steps` times; rows in seed_rows have a generator with that seed."""
    gens = [make_generator(seed_rows[r], "cpu") if r in seed_rows else None for r in range(n_rows)]
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=seed_rows[r]) if r in seed_rows
              else SamplingParams(temperature=0.5 + 0.3 * r, top_k=r) for r in range(n_rows)]
    got = {r: [] for r in seed_rows}
    for step in range(steps):
        logits = torch.sin(torch.arange(vocab, dtype=torch.float32) * (step + 1) * 0.37).repeat(n_rows, 1) * 3
        ids = Sampler()(logits, build(params, vocab, gens)).sampled_token_ids.tolist()
        for r in seed_rows:
            got[r].append(ids[r])
    return got


def test_seeded_rows_reproducible_whatever_the_batch():
    alone = _run_seeded({0: 1234}, 1, 20)[0]
    torch.manual_seed(99)  # unseeded neighbours consume the default generator
    mixed = _run_seeded({3: 1234, 1: 7}, 5, 20)
    assert mixed[3] == alone
    other = _run_seeded({0: 7}, 1, 20)[0]
    assert other == mixed[1]
    assert other != alone  # different seeds give different streams (64-token vocab, 20 steps)


def test_make_generator_accepts_any_int():
    a = torch.rand(3, generator=make_generator(-5, "cpu"))
    b = torch.rand(3, generator=make_generator(-5, "cpu"))
    assert torch.equal(a, b)
    make_generator(2**64 - 1, "cpu")


def test_top_k_top_p_min_p_masks_hand_checked():
    logits = P5.log().unsqueeze(0)
    keep = lambda x: (x[0] > float("-inf")).nonzero().flatten().tolist()
    assert keep(apply_top_k_top_p(logits, torch.tensor([2]), 2, None)) == [0, 1]
    assert keep(apply_top_k_top_p(logits, torch.tensor([0]), 1, None)) == [0, 1, 2, 3, 4]
    assert keep(apply_top_k_top_p(logits, None, 0, torch.tensor([0.75]))) == [0, 1, 2]
    assert keep(apply_top_k_top_p(logits, None, 0, torch.tensor([0.45]))) == [0, 1]
    assert keep(apply_top_k_top_p(logits, None, 0, torch.tensor([0.35]))) == [0]
    assert keep(apply_top_k_top_p(logits, None, 0, torch.tensor([1.0]))) == [0, 1, 2, 3, 4]
    # top-k then top-p on the renormalized top-3 (0.4, 0.25, 0.2)/0.85: p=0.6 keeps the first 2
    assert keep(apply_top_k_top_p(logits, torch.tensor([3]), 3, torch.tensor([0.6]))) == [0, 1]
    # per-row values in one batch
    two = logits.repeat(2, 1)
    masked = apply_top_k_top_p(two, torch.tensor([1, 0]), 1, torch.tensor([1.0, 0.75]))
    assert keep(masked[:1]) == [0] and keep(masked[1:]) == [0, 1, 2]
    # through the sampler: only kept tokens are ever drawn (min_p 0.35 -> prob >= 0.14)
    rows = 2000
    for params, allowed in [(SamplingParams(top_k=2), {0, 1}), (SamplingParams(top_p=0.75), {0, 1, 2}),
                            (SamplingParams(min_p=0.35), {0, 1, 2}), (SamplingParams(min_p=0.7), {0})]:
        torch.manual_seed(1)
        ids = Sampler()(logits.repeat(rows, 1), build([params] * rows, 5)).sampled_token_ids
        assert set(ids.tolist()) == allowed, params


def test_masks_match_transformers_warpers():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(3)
    logits = torch.randn(4, 100) * 2
    for k in (1, 5, 37):
        ours = apply_top_k_top_p(logits, torch.full((4,), k), k, None)
        assert torch.equal(ours, TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9):
        ours = apply_top_k_top_p(logits, None, 0, torch.full((4,), p))
        assert torch.equal(ours.isinf(), TopPLogitsWarper(p)(None, logits.clone()).isinf())
    ours = apply_top_k_top_p(logits, torch.full((4,), 10), 10, torch.full((4,), 0.6))
    hf = TopPLogitsWarper(0.6)(None, TopKLogitsWarper(10)(None, logits.clone()))
    assert torch.equal(ours.isinf(), hf.isinf())
    probs = logits.softmax(-1)
    hf_minp = MinPLogitsWarper(0.2)(None, logits.clone()).isinf()
    assert torch.equal(probs < 0.2 * probs.amax(-1, keepdim=True), hf_minp)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.5, 0), (2.0, 3)])
def test_temperature_statistics(temperature, top_k):
    rows = 40000
    logits = P5.log().repeat(rows, 1)
    torch.manual_seed(1234)
    ids = Sampler()(logits, build([SamplingParams(temperature=temperature, top_k=top_k)] * rows, 5))
    freq = torch.bincount(ids.sampled_token_ids, minlength=5).float() / rows
    expected = P5 ** (1 / temperature)
    if top_k:
        expected[top_k:] = 0
    expected /= expected.sum()
    assert (freq - expected).abs().max() < 0.012, (freq, expected)  # > 4 sigma for 40k draws


def test_seeded_statistics_and_padded_vocab():
    # one seeded row drawn 3000 times by its own generator; vocab padded to 8 with 3 fake ids
    gen = make_generator(5, "cpu")
    batch = build([SamplingParams(seed=5)], 5, gens=[gen])
    logits = torch.cat([P5.log(), torch.full((3,), 10.0)]).unsqueeze(0)
    counts = torch.zeros(8)
    for _ in range(3000):
        counts[Sampler()(logits, batch).sampled_token_ids[0]] += 1
    assert counts[5:].sum() == 0
    assert (counts[:5] / 3000 - P5).abs().max() < 0.035


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25, logprobs=4)
    out = Sampler()(logits, build([p], 5, prompts=[[0]], outputs=[[1, 1, 3]]))
    expected = torch.tensor([1.0, -3.25, 0.5, 0.75, -2.0])
    # token 0 (prompt only): 2/2; token 1 (output x2): -1*2 - 0.5*2 - 0.25; token 3: 3/2 - 0.5 - 0.25
    assert out.sampled_token_ids.item() == 0
    assert torch.allclose(out.top_logprobs[0], expected.log_softmax(-1).sort(descending=True).values[:4])
    assert out.top_logprob_ids[0].tolist() == [0, 3, 2, 4]
    # a row without penalties in the same batch is untouched
    both = build([p, SamplingParams(temperature=0, logprobs=0)], 5, prompts=[[0], [0]],
                 outputs=[[1, 1, 3]] * 2)
    out2 = Sampler()(logits.repeat(2, 1), both)
    assert math.isclose(out2.sampled_logprobs[1].item(), logits.log_softmax(-1)[0, 3].item(), rel_tol=1e-6)
    assert out2.top_logprobs.shape == (2, 4)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 30)
    prompts, outputs = [[1, 2, 3], [4, 5]], [[3, 7, 7], [9]]
    batch = build([SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=0)] * 2, 30,
                  prompts=prompts, outputs=outputs)
    ids = torch.tensor([[1, 2, 3, 3, 7, 7], [4, 5, 9, 9, 9, 9]])
    hf = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    out = Sampler()(logits, batch)
    assert torch.equal(out.sampled_token_ids, hf.argmax(-1))
    ref = hf.log_softmax(-1).gather(1, out.sampled_token_ids[:, None])[:, 0]
    assert torch.allclose(out.sampled_logprobs, ref)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])  # eos=1 and stop id 3 are the most likely
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    assert Sampler()(logits, build([p], 4, outputs=[[2]], eos={1})).sampled_token_ids.item() == 2
    assert Sampler()(logits, build([p], 4, outputs=[[2, 2]], eos={1})).sampled_token_ids.item() == 1
    ignore = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert Sampler()(logits, build([ignore], 4, outputs=[[]], eos={1})).sampled_token_ids.item() == 1


def test_logprobs_are_pre_temperature_and_mixed_requests():
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    params = [SamplingParams(temperature=0.3, top_k=3, logprobs=2), SamplingParams(),
              SamplingParams(temperature=0, logprobs=5)]
    out = Sampler()(logits, build(params, 20))
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.sampled_logprobs, ref.gather(1, out.sampled_token_ids[:, None])[:, 0])
    assert out.top_logprob_ids.shape == (3, 5)
    top = ref.topk(5)
    assert torch.equal(out.top_logprob_ids, top.indices) and torch.allclose(out.top_logprobs, top.values)
    out0 = Sampler()(logits, build([SamplingParams(logprobs=0)] * 3, 20))
    assert out0.sampled_logprobs.shape == (3,) and out0.top_logprobs is None


def test_compute_prompt_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(9, 33).to(torch.bfloat16)
    nxt = torch.randint(0, 33, (9,))
    tok, ids, lps = compute_prompt_logprobs(logits, nxt, 3, chunk=4)
    ref = logits.float().log_softmax(-1)
    assert torch.allclose(tok, ref.gather(1, nxt[:, None])[:, 0])
    assert torch.equal(ids, ref.topk(3).indices) and torch.allclose(lps, ref.topk(3).values)
    tok0, ids0, lps0 = compute_prompt_logprobs(logits, nxt, 0)
    assert ids0 is None and lps0 is None and torch.allclose(tok0, tok)
    with pytest.raises(ValueError, match="next_token_ids"):
        compute_prompt_logprobs(logits, nxt[:3], 1)


def test_build_checks_lengths_and_fast_paths():
    with pytest.raises(ValueError, match="num_rows=1"):
        Sampler()(torch.zeros(2, 10), build([SamplingParams()], 10))
    with pytest.raises(ValueError, match="vocab >= 10"):
        Sampler()(torch.zeros(1, 9), build([SamplingParams()], 10))
    with pytest.raises(ValueError, match="same length"):
        SamplingBatch.build([SamplingParams()], [], [[]], [[]], 10, "cpu")
    b = build([SamplingParams(), SamplingParams(temperature=0)], 10)
    assert b.top_k is None and b.top_p is None and b.min_p is None and b.temperature is None
    assert b.seen_mask is None and b.output_counts is None and b.ban_rows is None
    assert b.max_num_logprobs is None and b.greedy_mask is not None
