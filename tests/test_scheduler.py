"""Scheduler and KV-cache invariants with a fake runner (no model): every block returns to the
pool after any mix of requests, aborts and preemptions; budgets are respected; prefix hits."""

from __future__ import annotations

import random

import pytest

from anybit.config import CacheConfig, SchedulerConfig
from anybit.core.block_pool import BlockPool
from anybit.core.outputs import RunnerOutput, SampledToken
from anybit.core.request import Request
from anybit.core.scheduler import Scheduler
from anybit.sampling_params import SamplingParams


class FakeRunner:
    """Next token = (sum of the sequence's tokens) % 97 + 3: deterministic in the sequence alone,
    so preemption/recompute must not change the output."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.written: dict[int, int] = {}  # slot -> token, to check the block table

    def execute(self, sched):
        out = RunnerOutput(sampled={})
        for s in sched.seqs:
            for j, tok in enumerate(s.token_ids):
                pos = s.start_pos + j
                slot = s.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size
                self.written[slot] = tok
            if s.sample:
                seq = s.prompt_token_ids + s.output_token_ids
                # the whole context must be readable through the block table
                for pos, tok in enumerate(seq):
                    slot = s.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size
                    assert self.written[slot] == tok, "KV block content does not match the sequence"
                out.sampled[s.request_id] = SampledToken((sum(seq) % 97) + 3)
        return out


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=True):
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
                      CacheConfig(block_size=8, enable_prefix_caching=caching), num_blocks, max_model_len=512)
    sched.kv.block_size = block_size
    return sched, FakeRunner(block_size)


def req(rid, prompt, max_tokens=10, leader=None):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), {1}, max_tokens,
                   leader_id=leader)


def run_all(sched, runner, max_steps=10_000):
    outputs: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    for _ in range(max_steps):
        if not sched.num_unfinished and not sched.has_pending_outputs():
            break
        so = sched.schedule()
        assert so.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(so.seqs) <= sched.config.max_num_seqs
        ro = runner.execute(so)
        for co in sched.update_from_output(so, ro):
            outputs.setdefault(co.request_id, []).extend(co.new_token_ids)
            if co.finish_reason:
                finish[co.request_id] = co.finish_reason
    return outputs, finish


def test_blocks_return_after_mixed_workload_with_preemption_and_aborts():
    rng = random.Random(0)
    sched, runner = make(num_blocks=24, block_size=4, budget=16)
    prompts = {f"r{i}": [rng.randrange(5, 200) for _ in range(rng.randrange(1, 30))] for i in range(20)}
    for rid, p in prompts.items():
        sched.add_request(req(rid, p, max_tokens=rng.randrange(1, 20)))
    steps = 0
    outputs: dict[str, list[int]] = {}
    while sched.num_unfinished or sched.has_pending_outputs():
        so = sched.schedule()
        ro = runner.execute(so)
        for co in sched.update_from_output(so, ro):
            outputs.setdefault(co.request_id, []).extend(co.new_token_ids)
        steps += 1
        if steps % 7 == 0 and sched.running:
            sched.abort_request(rng.choice(sched.running).request_id)
        assert steps < 5000
    assert sched.num_preemptions > 0, "the tiny cache should have forced preemption"
    assert sched.kv.pool.check_all_free()
    assert not sched.kv.req_blocks


def test_preemption_does_not_change_outputs():
    rng = random.Random(1)
    prompts = {f"r{i}": [rng.randrange(5, 200) for _ in range(rng.randrange(5, 40))] for i in range(12)}
    results = []
    for num_blocks in (400, 20):
        sched, runner = make(num_blocks=num_blocks, block_size=4, budget=24)
        for rid, p in prompts.items():
            sched.add_request(req(rid, p, max_tokens=15))
        outputs, finish = run_all(sched, runner)
        results.append(outputs)
        assert sched.kv.pool.check_all_free()
        assert all(f in ("length", "stop") for f in finish.values()) and len(finish) == len(prompts)
    assert results[0] == results[1]
    assert sched.num_preemptions > 0


def test_prefix_cache_hits_full_blocks_and_leaves_one_token():
    sched, runner = make(num_blocks=64, block_size=4)
    shared = list(range(10, 22))  # 12 tokens = 3 full blocks
    sched.add_request(req("a", shared + [50, 51], max_tokens=2))
    run_all(sched, runner)
    b = req("b", shared + [60], max_tokens=2)
    sched.add_request(b)
    so = sched.schedule()
    assert so.seqs[0].start_pos == 12 and b.num_cached_tokens == 12
    run_all(sched, runner)
    c = req("c", list(shared), max_tokens=2)  # fully cached prompt: the last block is recomputed
    sched.add_request(c)
    so = sched.schedule()
    assert so.seqs[0].start_pos == 8 and so.seqs[0].token_ids == shared[8:]
    run_all(sched, runner)
    assert sched.kv.pool.check_all_free()


def test_n_siblings_wait_for_leader_then_share_prompt_blocks():
    sched, runner = make(num_blocks=64, block_size=4)
    prompt = list(range(30, 47))  # 17 tokens
    sched.add_request(req("g#0", prompt, max_tokens=3))
    sched.add_request(req("g#1", prompt, max_tokens=3, leader="g#0"))
    so = sched.schedule()
    assert [s.request_id for s in so.seqs] == ["g#0"]
    sched.update_from_output(so, runner.execute(so))
    so = sched.schedule()
    sib = [s for s in so.seqs if s.request_id == "g#1"][0]
    assert sib.start_pos == 16
    assert sched.kv.req_blocks["g#1"][:4] == sched.kv.req_blocks["g#0"][:4]
    sched.update_from_output(so, runner.execute(so))
    run_all(sched, runner)
    assert sched.kv.pool.check_all_free()


def test_stop_token_and_eos_and_max_tokens():
    sched, runner = make()
    sched.add_request(Request("x", [5, 6], SamplingParams(max_tokens=4), {1}, 4))
    _, finish = run_all(sched, runner)
    assert finish["x"] == "length"


def test_block_pool_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
    pool = BlockPool(2)
    ids = pool.allocate(2)
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks, 0 free"):
        pool.allocate(1)
    pool.free(ids)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(ids)


def test_prompt_too_large_for_cache_is_rejected():
    sched, _ = make(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="prompt: 20 tokens need"):
        sched.add_request(req("big", list(range(5, 25))))


def test_sequence_outgrowing_the_whole_cache_finishes_with_length():
    sched, runner = make(num_blocks=4, block_size=4)
    sched.add_request(req("long", [5, 6, 7, 8, 9, 10], max_tokens=100))
    outputs, finish = run_all(sched, runner)
    assert finish["long"] == "length"
    assert len(outputs["long"]) == 4 * 4 - 6 + 1  # the last sampled token needs no slot yet
    assert sched.kv.pool.check_all_free()


def test_admit_batch_groups_prefills_and_keeps_outputs():
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(5, 200) for _ in range(rng.randrange(3, 12))] for i in range(16)}
    max_tokens = {rid: rng.randrange(2, 10) for rid in prompts}
    results, mixed = [], []
    for admit in (1, 4):
        sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, admit_batch=admit),
                          CacheConfig(block_size=8), 200, max_model_len=512)
        runner = FakeRunner(8)
        for rid, p in prompts.items():
            sched.add_request(req(rid, p, max_tokens=max_tokens[rid]))
        n_mixed = 0
        outputs: dict[str, list[int]] = {}
        while sched.num_unfinished:
            so = sched.schedule()
            lens = [s.num_new_tokens for s in so.seqs]
            n_mixed += any(n > 1 for n in lens) and any(n == 1 for n in lens)
            for co in sched.update_from_output(so, runner.execute(so)):
                outputs.setdefault(co.request_id, []).extend(co.new_token_ids)
        assert sched.kv.pool.check_all_free()
        results.append(outputs)
        mixed.append(n_mixed)
    assert results[0] == results[1]  # same tokens, fewer mixed prefill+decode steps
    assert mixed[1] < mixed[0]


def test_full_blocks_are_registered_once_each_and_after_preemption(monkeypatch):
    """cache_full_blocks registers only the blocks filled since its last call (a step costs
    O(new blocks), not O(context)), and every full block of prompt and output ends up in the
    prefix cache."""
    calls: list[int] = []
    original = BlockPool.cache_block

    def counting(self, block_id, block_hash):
        calls.append(block_id)
        return original(self, block_id, block_hash)

    monkeypatch.setattr(BlockPool, "cache_block", counting)
    rng = random.Random(3)
    prompts = {f"r{i}": [rng.randrange(5, 200) for _ in range(rng.randrange(5, 30))] for i in range(10)}
    for num_blocks in (20, 400):  # with preemption (blocks recomputed), then without
        calls.clear()
        sched, runner = make(num_blocks=num_blocks, block_size=4, budget=24)
        for rid, p in prompts.items():
            sched.add_request(req(rid, p, max_tokens=12))
        outputs, _ = run_all(sched, runner)
        full = {rid: (len(p) + 11) // 4 for rid, p in prompts.items()}  # the last token is never computed
        if num_blocks == 20:
            assert sched.num_preemptions > 0
            assert len(calls) <= sum(full.values()) * (1 + sched.num_preemptions)
            continue
        assert sched.num_preemptions == 0 and len(calls) == sum(full.values())
        for rid, p in prompts.items():  # nothing was evicted: every full block is a hit
            blocks, cached = sched.kv.get_computed_blocks(req(rid + "x", p + outputs[rid][:-1] + [7]))
            assert len(blocks) == full[rid] and cached == 4 * full[rid]
