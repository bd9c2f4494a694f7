"""LLMEngine: the engine behind ``LLM`` and the server (one ``step()`` call at a time; with
async scheduling the device already runs the next step while a call returns its outputs).

In: ``add_request(request_id, prompt (text or token ids), SamplingParams)``, ``abort_request``.
Out: ``step() -> list[RequestOutput]`` for the requests that progressed (text detokenized
incrementally, stop strings applied, n > 1 completions grouped under one request id).
Owns the tokenizer, the EngineCore (scheduler + model runner).
"""

from __future__ import annotations

import time

from anybit.config import EngineConfig
from anybit.core.engine_core import EngineCore
from anybit.core.outputs import EngineCoreOutput
from anybit.core.request import Request
from anybit.core.scheduler import Scheduler
from anybit.detokenizer import IncrementalDetokenizer
from anybit.outputs import CompletionOutput, RequestOutput
from anybit.runtime.loader import check_model_folder
from anybit.runtime.model_runner import ModelRunner
from anybit.runtime.sampler import make_generator
from anybit.sampling_params import SamplingParams
from anybit.tokenizer import Tokenizer


class _Child:
    __slots__ = ("group", "index", "detok", "out")

    def __init__(self, group, index, detok):
        self.group = group
        self.index = index
        self.detok = detok
        self.out = CompletionOutput(index=index)


class _Group:
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "children", "prompt_logprobs",
                 "num_cached_tokens", "arrival", "first_token_time")

    def __init__(self, request_id, prompt, prompt_token_ids):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.children: list[_Child] = []
        self.prompt_logprobs = None
        self.num_cached_tokens = 0
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        check_model_folder(config.model.model)
        self.tokenizer = Tokenizer.from_folder(config.model.model)
        self.runner = ModelRunner(config, progress=progress)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_blocks, self.max_model_len)
        self.async_scheduling = self._resolve_async_scheduling()
        self.core = EngineCore(self.scheduler, self.runner, async_scheduling=self.async_scheduling)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.runner.arch.eos_token_ids)
        self.runner.eos_token_ids = self.eos_token_ids
        self._groups: dict[str, _Group] = {}
        self._children: dict[str, _Child] = {}

    def _resolve_async_scheduling(self) -> bool:
        """SchedulerConfig.async_scheduling, with None (auto) meaning on where decode steps run as
        CUDA graphs: there the host work it hides is a sizeable part of a step."""
        want = self.config.scheduler.async_scheduling
        if want is not None:
            return want
        graphs = self.runner.graph_runner
        return graphs is not None and graphs.enabled

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = True) -> LLMEngine:
        return cls(config, progress=progress)

    # ---- requests ------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt: must be a non-empty string or a non-empty list of token ids")
        ids = list(prompt)
        bad = [t for t in ids
               if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]!r} is not in the vocabulary [0, {self.vocab_size})")
        return None, ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self._groups:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if prompt_token_ids is None:
            text, ids = self.encode_prompt(prompt)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within max_model_len "
                             f"{self.max_model_len}")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        group = _Group(request_id, text, ids)
        requests = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            generator = None
            if params.seed is not None:
                generator = make_generator(params.seed + i, self.runner.device)
            req = Request(child_id, ids, params, self.eos_token_ids, max_tokens, generator=generator,
                          group_id=request_id, index=i,
                          leader_id=(f"{request_id}#0" if i > 0 else None))
            child = _Child(group, i, IncrementalDetokenizer(self.tokenizer, ids, params))
            if params.logprobs is not None:
                child.out.logprobs = []
                child.out.cumulative_logprob = 0.0
            group.children.append(child)
            requests.append(req)
        for req in requests:  # validates before anything is registered
            self.core.add_request(req)
        self._groups[request_id] = group
        for req, child in zip(requests, group.children):
            self._children[req.request_id] = child

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            child_id = request_id if len(group.children) == 1 else f"{request_id}#{child.index}"
            self.core.abort_request(child_id)
            self._children.pop(child_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or self.core.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def get_stats(self) -> dict:
        return self.scheduler.get_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block (the blocks stay free for reuse), e.g. between benchmark
        passes over the same prompts. Only while no request is in progress: returns False (and
        changes nothing) otherwise."""
        if self.has_unfinished_requests():
            return False
        self.scheduler.kv.pool.reset_prefix_cache()
        return True

    # ---- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        touched: dict[str, _Group] = {}
        for co in core_outputs:
            child = self._children.get(co.request_id)
            if child is None:
                continue
            self._apply(co, child)
            touched[child.group.request_id] = child.group
        results = []
        for group in touched.values():
            results.append(self._make_output(group))
        return results

    def _apply(self, co: EngineCoreOutput, child: _Child) -> None:
        out = child.out
        group = child.group
        if co.prompt_logprobs is not None and child.index == 0 and group.prompt_logprobs is None:
            group.prompt_logprobs = list(co.prompt_logprobs)
        if co.num_cached_tokens and child.index == 0:
            group.num_cached_tokens = co.num_cached_tokens
        if co.new_token_ids:
            if group.first_token_time is None:
                group.first_token_time = time.monotonic()
            out.token_ids.extend(co.new_token_ids)
            out.delta_token_ids.extend(co.new_token_ids)
            if co.new_logprobs is not None and out.logprobs is not None:
                for lp in co.new_logprobs:
                    out.logprobs.append(lp)
                    tok = out.token_ids[len(out.logprobs) - 1]
                    out.cumulative_logprob = (out.cumulative_logprob or 0.0) + lp.get(tok, 0.0)
            stop_token = co.finish_reason == "stop" and not isinstance(co.stop_reason, str)
            delta, stop = child.detok.append(co.new_token_ids, stop_terminated=stop_token)
            out.delta_text += delta
            if stop is not None and co.finish_reason is None:
                self.scheduler.finish_by_stop_string(co.request_id, stop)
                out.finish_reason, out.stop_reason = "stop", stop
        if co.finish_reason is not None and out.finish_reason is None:
            out.finish_reason = co.finish_reason
            out.stop_reason = co.stop_reason
            out.delta_text += child.detok.flush()
        out.text = child.detok.output_text
        if out.finish_reason is not None:
            self._children.pop(co.request_id, None)

    def _make_output(self, group: _Group) -> RequestOutput:
        outs = []
        for child in group.children:
            o = child.out
            outs.append(CompletionOutput(
                index=o.index, text=o.text, token_ids=list(o.token_ids), finish_reason=o.finish_reason,
                stop_reason=o.stop_reason, logprobs=list(o.logprobs) if o.logprobs is not None else None,
                cumulative_logprob=o.cumulative_logprob, delta_text=o.delta_text,
                delta_token_ids=list(o.delta_token_ids)))
            o.delta_text = ""
            o.delta_token_ids = []
        finished = all(c.out.finish_reason is not None for c in group.children)
        if finished:
            self._groups.pop(group.request_id, None)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished,
                             group.prompt_logprobs, group.num_cached_tokens)
