"""Token-budget scheduler: continuous batching with chunked prefill and preemption by recompute.

In: requests (add / abort / finish_by_stop_string) and, each step, the RunnerOutput of the last
SchedulerOutput. Out: ``schedule() -> SchedulerOutput`` (decodes and prefill chunks under
``max_num_batched_tokens`` and ``max_num_seqs``) and ``update_from_output() ->
list[EngineCoreOutput]``. Called by EngineCore.

Async scheduling: ``schedule_overlapped(inflight)`` schedules the step after one whose sampled
tokens are not read yet (one decode of each in-flight token), or returns None when only
``schedule()`` with the results in hand can decide the next step.

Policy: running requests first, in arrival order; when blocks run out, the most recently
started running request is preempted (its blocks freed, its tokens recomputed later; nothing is
lost). Waiting requests are admitted first-come first-served.
"""

from __future__ import annotations

from collections import deque

from anybit.config import CacheConfig, SchedulerConfig
from anybit.core.kv_cache_manager import KVCacheManager
from anybit.core.outputs import (
    PLACEHOLDER_TOKEN,
    EngineCoreOutput,
    RunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from anybit.core.request import Request, RequestStatus


class Scheduler:
    def __init__(self, sched_config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 max_model_len: int):
        self.config = sched_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_pending: list[EngineCoreOutput] = []

    # ---- request lifecycle ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        max_blocks = self.kv.blocks_needed(min(request.num_prompt_tokens + 1, self.max_model_len))
        if max_blocks > self.kv.num_blocks:
            raise ValueError(f"prompt: {request.num_prompt_tokens} tokens need {max_blocks} KV blocks but "
                             f"the cache has {self.kv.num_blocks}; raise kv_cache_memory")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        return self._finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_by_stop_string(self, request_id: str, stop: str) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            request.stop_reason = stop
            self._finish(request_id, RequestStatus.FINISHED_STOPPED, emit=False)

    def _finish(self, request_id: str, status: RequestStatus, emit: bool = True) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        if emit:
            self._finished_pending.append(EngineCoreOutput(request_id, [], None, status.value))
        return True

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_pending_outputs(self) -> bool:
        return bool(self._finished_pending)

    def take_pending_outputs(self) -> list[EngineCoreOutput]:
        """The final outputs of requests finished outside a step (aborts, cache overflow)."""
        results, self._finished_pending = self._finished_pending, []
        return results

    # ---- scheduling ----------------------------------------------------------------------
    def _preempt_last(self) -> Request:
        victim = self.running.pop()
        self.kv.free(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.prompt_logprobs = []
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def _chunk_len(self, request: Request, num_computed: int, budget: int) -> int:
        num_new = request.num_tokens - num_computed
        if num_new > budget:
            return budget if self.config.enable_chunked_prefill else 0
        return num_new

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._chunk_len(request, request.num_computed_tokens, budget)
            if num_new == 0:
                i += 1
                continue
            if self.kv.blocks_needed(request.num_computed_tokens + num_new) > self.kv.num_blocks:
                # the sequence has outgrown the whole cache: it ends here, as at max_model_len
                self._finish(request.request_id, RequestStatus.FINISHED_LENGTH)
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self._preempt_last()
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: everything after it is gone too

        skipped: list[Request] = []
        admit = self._may_admit(scheduled)
        while admit and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.leader_id is not None and self._leader_busy(request):
                skipped.append(self.waiting.popleft())
                continue
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            num_new = self._chunk_len(request, num_cached, budget)
            if num_new == 0 or not self.kv.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new
        for request in reversed(skipped):
            self.waiting.appendleft(request)

        seqs = [self._make_seq(r, n) for r, n in scheduled]
        return SchedulerOutput(seqs=seqs, num_batched_tokens=sum(n for _, n in scheduled),
                               preempted_ids=preempted)

    def _may_admit(self, scheduled: list[tuple[Request, int]]) -> bool:
        """Admit waiting requests this step? With ``admit_batch`` > 1, only when that many
        sequence slots are free, or when the step has no decode work, so that prefills come in
        groups and more steps stay decode-only (those run as CUDA graphs)."""
        want = self.config.admit_batch
        if want <= 1 or not self.waiting:
            return True
        free = self.config.max_num_seqs - len(self.running)
        return free >= min(want, len(self.waiting)) or not scheduled

    def _leader_busy(self, request: Request) -> bool:
        """An n > 1 sibling waits until the leader's prompt blocks are computed (then it hits
        them in the prefix cache) unless the leader is gone."""
        leader = self.requests.get(request.leader_id)
        if leader is None or not self.kv.enable_prefix_caching:
            return False
        return leader.num_computed_tokens < leader.num_prompt_tokens

    def _make_seq(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        return ScheduledSeq(
            request_id=request.request_id,
            token_ids=request.token_ids_range(start, start + num_new),
            start_pos=start,
            block_ids=self.kv.get_block_ids(request.request_id),
            sample=start + num_new == request.num_tokens,
            params=request.params,
            generator=request.generator,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            prompt_logprobs=request.wants_prompt_logprobs and start < request.num_prompt_tokens,
            num_prompt_tokens=request.num_prompt_tokens,
        )

    # ---- async scheduling ----------------------------------------------------------------
    def schedule_overlapped(self, inflight: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``inflight``, made before its sampled tokens are known: for every
        running request, one decode whose input is its in-flight token (a placeholder), with
        position and KV slot already advanced. Requests whose in-flight token is certainly their
        last (max_tokens, max_model_len) are left out; one that stops on that token (EOS, stop
        token or string, abort) has this step's token discarded by ``update_from_output``.

        Returns None when ``schedule()`` could decide differently once the results are in: a
        running request without an in-flight token (prefill chunk to go, not scheduled), a
        waiting request it would admit, a token budget or a free block count too small for
        every decode (no preemption here). The caller then reads ``inflight`` first."""
        sampling = {s.request_id for s in inflight.seqs if s.sample}
        if not self.running or any(r.request_id not in sampling for r in self.running):
            return None
        todo = [r for r in self.running if not self._last_token_in_flight(r)]
        if not todo or len(todo) > self.config.max_num_batched_tokens or self._would_admit(todo):
            return None
        new_blocks = 0
        for request in todo:  # in flight: num_computed_tokens + 1 == num_tokens + 1 tokens
            total = self.kv.blocks_needed(request.num_tokens + 1)
            if total > self.kv.num_blocks:
                return None  # schedule() ends it by length
            new_blocks += max(0, total - len(self.kv.get_block_ids(request.request_id)))
        if new_blocks > self.kv.num_free_blocks:
            return None
        seqs = []
        for request in todo:
            if not self.kv.allocate_slots(request, request.num_tokens + 1 - request.num_computed_tokens):
                raise RuntimeError(f"KV blocks counted free for {request.request_id} were not")
            seqs.append(self._make_inflight_seq(request))
        return SchedulerOutput(seqs=seqs, num_batched_tokens=len(seqs))

    def _last_token_in_flight(self, request: Request) -> bool:
        """The request's in-flight token ends it by length whatever its value."""
        num_out = len(request.output_token_ids) + 1
        return num_out >= request.max_tokens or request.num_tokens + 1 >= self.max_model_len

    def _would_admit(self, scheduled: list[Request]) -> bool:
        """Could schedule() admit a waiting request next to these decodes? (An upper bound: a
        request that then does not fit only costs one step of overlap.)"""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        if self.config.max_num_batched_tokens <= len(scheduled):
            return False
        return self._may_admit([(r, 1) for r in scheduled])

    def _make_inflight_seq(self, request: Request) -> ScheduledSeq:
        """A decode of the token sampled by the in-flight step (position num_tokens: the request's
        host state lags that step by one token)."""
        return ScheduledSeq(
            request_id=request.request_id, token_ids=[PLACEHOLDER_TOKEN], start_pos=request.num_tokens,
            block_ids=self.kv.get_block_ids(request.request_id), sample=True, params=request.params,
            generator=request.generator, prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids, prompt_logprobs=False,
            num_prompt_tokens=request.num_prompt_tokens, input_in_flight=True)

    # ---- results -------------------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, out: RunnerOutput) -> list[EngineCoreOutput]:
        results = self.take_pending_outputs()
        for seq in sched.seqs:
            request = self.requests.get(seq.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted or finished meanwhile (async: a token past the end, discarded)
            if seq.start_pos != request.num_computed_tokens:
                raise RuntimeError(f"{request.request_id}: step computed from position {seq.start_pos} "
                                   f"but the request is at {request.num_computed_tokens}")
            request.num_computed_tokens += seq.num_new_tokens
            prompt_lp = None
            if seq.request_id in out.prompt_logprobs:
                if not request.prompt_logprobs:
                    request.prompt_logprobs = [None]  # the first prompt token has no logprob
                request.prompt_logprobs.extend(out.prompt_logprobs[seq.request_id])
            if request.wants_prompt_logprobs and request.num_computed_tokens >= request.num_prompt_tokens \
                    and seq.start_pos < request.num_prompt_tokens:
                prompt_lp = request.prompt_logprobs[:request.num_prompt_tokens]
            self.kv.cache_full_blocks(request)
            sampled = out.sampled.get(seq.request_id) if seq.sample else None
            if sampled is None:
                if prompt_lp is not None:
                    results.append(EngineCoreOutput(request.request_id, [], None, None,
                                                    prompt_logprobs=prompt_lp))
                continue
            request.output_token_ids.append(sampled.token_id)
            lp = None
            if request.params.logprobs is not None:
                lp = dict(sampled.top_logprobs or {})
                if sampled.logprob is not None:
                    lp[sampled.token_id] = sampled.logprob
                    request.cumulative_logprob += sampled.logprob
                request.logprobs.append(lp)
            status = self._check_stop(request, sampled.token_id)
            finish = None
            if status is not None:
                finish = status.value
                self.requests.pop(request.request_id, None)
                self.running.remove(request)
                request.status = status
                self.kv.free(request)
            results.append(EngineCoreOutput(request.request_id, [sampled.token_id], [lp] if lp is not None
                                            else None, finish, request.stop_reason, prompt_lp,
                                            request.num_cached_tokens))
        return results

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        num_out = len(request.output_token_ids)
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token_id in (params.stop_token_ids or ()):
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if num_out >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def get_stats(self) -> dict:
        return {
            "num_waiting": len(self.waiting),
            "num_running": len(self.running),
            "kv_cache_usage": self.kv.usage(),
            "num_free_blocks": self.kv.num_free_blocks,
            "num_total_blocks": self.kv.num_blocks,
            "num_preemptions": self.num_preemptions,
            "prefix_cache_queries": self.kv.pool.queries,
            "prefix_cache_hits": self.kv.pool.hits,
        }
