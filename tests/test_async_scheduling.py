"""Async scheduling (step N+1 launched before step N's tokens are read) gives exactly the outputs
of the synchronous engine: same tokens, logprobs, texts, finish and stop reasons, on a tiny CPU
model, for every feature that touches the in-flight token. Each test also checks that steps were
actually overlapped (so a silent fallback to the synchronous path fails) and that every KV block
returns to the pool."""

from __future__ import annotations

import types

import pytest
import torch

from anybit import LLM, SamplingParams
from anybit.config import CacheConfig, SchedulerConfig
from anybit.core.outputs import PLACEHOLDER_TOKEN, RunnerOutput, SampledToken
from anybit.core.request import Request
from anybit.core.scheduler import Scheduler
from tests.model_factory import make_tiny_model

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "héllo 日本語", "import os\nimport sys\n",
           "Paged attention stores keys", "for i in range(10):"]
TINY_KV = 12 * 2 * 2 * 8 * 2 * 16 * 4  # 12 blocks of 8 tokens for the tiny llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("async_llama"), arch="llama")


def make_llm(model_dir, async_scheduling: bool, **kw) -> LLM:
    return LLM(model_dir, dtype="float32", device="cpu", block_size=8, progress=False,
               async_scheduling=async_scheduling, **kw)


@pytest.fixture(scope="module")
def pair(model_dir):
    """(synchronous LLM, async LLM) on the same model."""
    return make_llm(model_dir, False), make_llm(model_dir, True)


def summary(outputs) -> list:
    """Everything a user sees of a list of RequestOutputs."""
    return [(o.prompt_token_ids, o.prompt_logprobs, o.num_cached_tokens, o.finished,
             [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob)
              for c in o.outputs]) for o in outputs]


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.kv.pool.check_all_free()
    assert not engine.scheduler.running and not engine.scheduler.waiting


def generate_both(pair, prompts, params) -> list:
    """Generate with both engines, assert equal outputs and that the async one overlapped."""
    sync, asy = pair
    before = asy.engine.core.num_overlapped_steps
    want = sync.generate(prompts, params)
    got = asy.generate(prompts, params)
    assert summary(got) == summary(want)
    assert asy.engine.core.num_overlapped_steps > before
    assert sync.engine.core.num_overlapped_steps == 0
    assert_idle(sync)
    assert_idle(asy)
    return want


def test_switch_defaults_off_on_cpu(model_dir, pair):
    assert pair[1].engine.core.async_scheduling and not pair[0].engine.core.async_scheduling
    auto = LLM(model_dir, dtype="float32", device="cpu", progress=False)
    assert auto.engine.async_scheduling is False  # auto: on only with CUDA graphs
    with pytest.raises(ValueError, match="async_scheduling"):
        SchedulerConfig(async_scheduling="yes")


def test_cli_flag():
    import argparse

    from anybit.cli_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert "--no-async-scheduling" in parser.format_help()
    for argv, want in (([], None), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        assert engine_config_from_args(parser.parse_args(argv), "m").scheduler.async_scheduling is want


def test_greedy_batch(pair):
    generate_both(pair, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))


def test_seeded_sampling_mixed_with_greedy_and_n(pair):
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=11, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=1.2, top_k=20, max_tokens=17, seed=3, n=3, ignore_eos=True),
              SamplingParams(temperature=0.7, min_p=0.05, max_tokens=9, seed=5, n=2, logprobs=2,
                             ignore_eos=True)]
    outs = generate_both(pair, PROMPTS[:4], params)
    assert len({tuple(c.token_ids) for c in outs[2].outputs}) > 1


def test_logprobs_and_prompt_logprobs(pair):
    params = [SamplingParams(temperature=0.0, max_tokens=7, logprobs=3, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=9, logprobs=0, seed=8, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=2, logprobs=1, ignore_eos=True)]
    outs = generate_both(pair, PROMPTS[:3], params)
    assert outs[2].prompt_logprobs is not None and len(outs[0].outputs[0].logprobs) == 7


def test_penalties_and_min_tokens_see_the_in_flight_token(pair):
    # the penalties count the previous step's token, which is still on the device when the next
    # step samples: the sampler must get it there (a lagging history gives other tokens)
    params = [SamplingParams(temperature=0.0, max_tokens=20, frequency_penalty=1.5, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.8, logprobs=1,
                             ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=20, presence_penalty=2.0, seed=4, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, frequency_penalty=-2.0, ignore_eos=True)]
    generate_both(pair, PROMPTS[:4], params)
    # min_tokens bans stop tokens while fewer outputs than min_tokens exist (in-flight ones count)
    sync, _ = pair
    toks = sync.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    stop = toks.outputs[0].token_ids[2]
    for min_tokens in (3, 4, 6):
        generate_both(pair, PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=16, min_tokens=min_tokens,
                                                       stop_token_ids=[stop], frequency_penalty=0.0))


def test_stop_tokens_and_eos_at_different_steps(pair):
    sync, asy = pair
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs = [o.outputs[0].token_ids for o in sync.generate(PROMPTS, greedy)]
    # stop tokens: each prompt stops at a different step (first, middle, never)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[toks[k]])
              for toks, k in zip(runs, (0, 1, 3, 7, 12, 23))]
    outs = generate_both(pair, PROMPTS, params)
    assert {len(o.outputs[0].token_ids) for o in outs} != {24}
    # EOS: make a token the model emits at various steps an end-of-sequence token for both engines
    eos = runs[0][5]
    for llm in pair:
        llm.engine.eos_token_ids.add(eos)
    try:
        outs = generate_both(pair, PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))
    finally:
        for llm in pair:
            llm.engine.eos_token_ids.discard(eos)
    stopped = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert stopped and all(c.stop_reason is None and c.token_ids[-1] == eos for c in stopped)


def test_stop_strings(pair):
    sync, _ = pair
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    texts = [o.outputs[0].text for o in sync.generate(PROMPTS, greedy)]
    params = [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, stop=[t[a:a + 3]])
              for t, a in zip(texts, (0, 2, 5, 9, 14, 20))]
    outs = generate_both(pair, PROMPTS, params)
    assert any(c.finish_reason == "stop" and isinstance(c.stop_reason, str) for o in outs for c in o.outputs)


def test_max_tokens_one_and_two(pair):
    params = [SamplingParams(temperature=0.0, max_tokens=1), SamplingParams(temperature=0.0, max_tokens=2),
              SamplingParams(temperature=0.5, max_tokens=1, seed=1),
              SamplingParams(temperature=0.0, max_tokens=6)]
    generate_both(pair, PROMPTS[:4], params)


def test_prefix_cache_hits(pair):
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    params = SamplingParams(temperature=0.0, max_tokens=19, ignore_eos=True)
    first = generate_both(pair, prompt, params)
    again = generate_both(pair, [prompt, prompt + "Paged attention"], params)
    assert again[0].num_cached_tokens > 0 and first[0].outputs[0].token_ids == again[0].outputs[0].token_ids
    # a prompt that continues a finished generation hits every full block, the ones hashed from
    # generated tokens included (async: hashed once the in-flight tokens were known)
    follow = first[0].prompt_token_ids + first[0].outputs[0].token_ids
    outs = generate_both(pair, [follow], params)
    assert outs[0].num_cached_tokens == (len(follow) - 1) // 8 * 8


def test_tiny_kv_cache_preempts_with_same_outputs(model_dir):
    pair = tuple(make_llm(model_dir, flag, kv_cache_memory=TINY_KV) for flag in (False, True))
    assert pair[1].engine.runner.num_blocks == 12
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=24, seed=9, ignore_eos=True)] * 3
    generate_both(pair, PROMPTS, params)
    assert pair[1].engine.scheduler.num_preemptions > 0


def drive(llm: LLM, requests: dict[str, tuple[str, SamplingParams]], abort_after: dict[str, int]) -> dict:
    """Step an engine by hand, aborting requests after some step calls; returns per request the
    concatenated deltas (text, token ids), the last output, and the step of each abort."""
    engine = llm.engine
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got = {rid: ["", [], None] for rid in requests}
    calls = 0
    while engine.has_unfinished_requests():
        for rid, after in abort_after.items():
            if calls == after:
                engine.abort_request(rid)
        for out in engine.step():
            entry = got[out.request_id]
            entry[0] += out.outputs[0].delta_text
            entry[1] += out.outputs[0].delta_token_ids
            entry[2] = out
        calls += 1
    assert_idle(llm)
    return got


def test_streaming_and_aborts_through_engine_step(pair):
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    requests = {f"r{i}": (p, params) for i, p in enumerate(PROMPTS)}
    requests["s"] = (PROMPTS[0], SamplingParams(temperature=0.9, max_tokens=12, seed=2, n=2, ignore_eos=True))
    aborted = {"r1": 1, "r3": 4, "r5": 9}
    results = [drive(llm, requests, aborted) for llm in pair]
    full = drive(pair[0], requests, {})
    for rid in requests:
        if rid in aborted:  # aborted: a prefix (how long depends on when the abort lands)
            for res in results:
                text, toks, _ = res[rid]
                assert toks == full[rid][1][:len(toks)] and full[rid][0].startswith(text)
            continue
        for res in results:
            text, toks, last = res[rid]
            assert last.finished
            # streamed deltas add up to the final cumulative output
            assert text == last.outputs[0].text and toks == last.outputs[0].token_ids
        assert summary([results[1][rid][2]]) == summary([results[0][rid][2]])
    assert pair[1].engine.core.num_overlapped_steps > 0


def test_scheduler_overlapped_step():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, admit_batch=1), CacheConfig(block_size=8), 16, 64)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    a = Request("a", [5, 6, 7], params, {2}, max_tokens=3)
    b = Request("b", [5, 6, 7, 8, 9], params, {2}, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()
    nxt = sched.schedule_overlapped(first)
    # b's in-flight token is its last (max_tokens 1): only a decodes, from position 3, with a placeholder
    assert [(s.request_id, s.token_ids, s.start_pos, s.input_in_flight) for s in nxt.seqs] == \
        [("a", [PLACEHOLDER_TOKEN], 3, True)]
    assert sched.kv.get_block_ids("a") == nxt.seqs[0].block_ids and len(nxt.seqs[0].block_ids) == 1
    assert nxt.seqs[0].num_output_tokens == 1
    out = sched.update_from_output(first, RunnerOutput({"a": SampledToken(10), "b": SampledToken(11)}))
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in out] == \
        [("a", [10], None), ("b", [11], "length")]
    # a waiting request that schedule() would admit: the next step cannot be made blind
    c = Request("c", [1, 2], params, {2}, max_tokens=3)
    sched.add_request(c)
    assert sched.schedule_overlapped(nxt) is None
    out = sched.update_from_output(nxt, RunnerOutput({"a": SampledToken(2)}))
    assert out[0].new_token_ids == [2] and a.num_computed_tokens == 4 and a.all_token_ids == [5, 6, 7, 10, 2]


def test_graph_input_staging_matches_eager_prepare(model_dir):
    """DecodeGraphRunner.prepare_inputs (pinned staging, one copy per dtype, device gather of
    in-flight ids) fills the same inputs as ModelRunner.prepare; runs on CPU without graphs."""
    from anybit.core.outputs import ScheduledSeq
    from anybit.runtime.cuda_graph import DecodeGraphRunner

    llm = make_llm(model_dir, False, max_num_seqs=8)
    runner = llm.engine.runner
    fake = types.SimpleNamespace(backend=types.SimpleNamespace(name="torch"), config=runner.config,
                                 max_model_len=runner.max_model_len, block_size=runner.block_size,
                                 device=runner.device)
    graphs = DecodeGraphRunner(fake)
    params = SamplingParams()

    def seq(rid, token, pos, blocks, inflight=False):
        return ScheduledSeq(rid, [PLACEHOLDER_TOKEN if inflight else token], pos, blocks, True, params, None,
                            [1], [], False, 1, input_in_flight=inflight)

    prev_ids = torch.tensor([70, 71, 72])
    for seqs, rows, sources in (
            ([seq("a", 5, 0, [3])], [], []),
            ([seq("a", 0, 9, [3, 7], True), seq("b", 8, 17, [1, 2, 4]), seq("c", 0, 3, [6], True)],
             [0, 2], [2, 0]),
            ([seq("b", 0, 18, [1, 2, 4], True)], [0], [1])):
        b = graphs.prepare_inputs(seqs, rows, sources, prev_ids)
        n = len(seqs)
        ids, pos, meta = runner.prepare([s if not s.input_in_flight else seq(s.request_id, 0, s.start_pos,
                                                                            s.block_ids) for s in seqs])
        for r, src in zip(rows, sources):
            ids[r] = prev_ids[src]
        assert b == graphs.bucket(n)
        assert graphs.input_ids[:n].tolist() == ids.tolist()
        assert graphs.positions[:n].tolist() == pos.tolist()
        assert graphs.slot_mapping[:b].tolist() == meta.slot_mapping.tolist() + [-1] * (b - n)
        assert graphs.seq_lens[:b].tolist() == meta.seq_lens.tolist() + [1] * (b - n)
        width = meta.block_table.shape[1]
        assert graphs.block_table[:n, :width].tolist() == meta.block_table.tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_async_matches_sync_on_cuda_graphs(tmp_path):
    path = make_tiny_model(tmp_path / "llama", arch="llama", hidden_size=128, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32)
    engines = {flag: LLM(path, dtype="float32", device="cuda", block_size=16, kv_cache_memory=64 << 20,
                         progress=False, async_scheduling=flag) for flag in (False, True)}
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    first = engines[False].generate(PROMPTS[4], greedy)[0].outputs[0].token_ids
    params = [greedy,
              SamplingParams(temperature=0.8, max_tokens=33, seed=3, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=29, frequency_penalty=1.0, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=25, seed=4, n=2, ignore_eos=True),
              # stops early: the async engine has decoded one token past it, then discards it
              SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[first[6]])]
    outs = {}
    for flag, llm in engines.items():
        assert llm.engine.runner.graph_runner is not None
        outs[flag] = summary(llm.generate(PROMPTS[:5], params)) + summary(llm.generate(PROMPTS, greedy))
        assert llm.engine.runner.graph_runner.captured
        assert (llm.engine.core.num_overlapped_steps > 0) == flag
        assert_idle(llm)
    auto = LLM(path, dtype="float32", device="cuda", kv_cache_memory=64 << 20, progress=False)
    assert auto.engine.async_scheduling  # on by default with CUDA graphs

    # tokens, texts, finish reasons must agree exactly; logprobs are compared with a tolerance in
    # case a kernel's reduction order is not deterministic
    def without_logprobs(rows):
        return [(r[:4], [c[:5] for c in r[4]]) for r in rows]

    assert without_logprobs(outs[True]) == without_logprobs(outs[False])
    assert outs[False][4][4][0][3] == "stop"
    for a, b in zip(outs[False], outs[True]):
        for ca, cb in zip(a[4], b[4]):
            if ca[5] is not None:
                assert [list(d.values()) for d in cb[5]] == [pytest.approx(list(d.values()), abs=1e-4)
                                                              for d in ca[5]]


def test_graph_choice_by_context(model_dir, monkeypatch):
    """The one-split short-context graph is chosen while every context (incl. the new token) fits
    ANYBIT_GRAPH_SHORT_CONTEXT and the bucket is small enough; the limit is validated and turned
    off where it would cover max_model_len anyway."""
    from anybit.core.outputs import ScheduledSeq
    from anybit.runtime import cuda_graph

    llm = make_llm(model_dir, False, max_num_seqs=64)
    runner = llm.engine.runner
    fake = types.SimpleNamespace(backend=types.SimpleNamespace(name="torch"), config=runner.config,
                                 max_model_len=runner.max_model_len, block_size=runner.block_size,
                                 device=runner.device)
    params = SamplingParams()

    def seqs(n, pos):
        blocks = list(range(1, pos // runner.block_size + 2))
        return [ScheduledSeq(f"r{i}", [5], pos, blocks, True, params, None, [1], [], False, 1)
                for i in range(n)]

    monkeypatch.setenv("ANYBIT_GRAPH_SHORT_CONTEXT", "40")
    graphs = cuda_graph.DecodeGraphRunner(fake)
    assert graphs.short_context == 40
    keys = graphs.graph_keys()
    assert (2, True) in keys and (1, True) not in keys and (64, True) not in keys and (64, False) in keys
    for n, pos, key in ((2, 38, (2, True)), (2, 39, (2, True)), (2, 40, (2, False)), (3, 10, (4, True)),
                        (1, 10, (1, False)), (40, 10, (48, False))):
        graphs.prepare_inputs(seqs(n, pos))
        assert graphs.last_key == key, (n, pos)
    monkeypatch.setenv("ANYBIT_GRAPH_SHORT_CONTEXT", "0")
    assert cuda_graph.DecodeGraphRunner(fake).graph_keys() == [(b, False) for b in reversed(graphs.buckets)]
    monkeypatch.setenv("ANYBIT_GRAPH_SHORT_CONTEXT", str(runner.max_model_len))
    assert cuda_graph.short_context_limit(runner.max_model_len) == 0
    monkeypatch.setenv("ANYBIT_GRAPH_SHORT_CONTEXT", "-5")
    with pytest.raises(ValueError, match="ANYBIT_GRAPH_SHORT_CONTEXT"):
        cuda_graph.DecodeGraphRunner(fake)
