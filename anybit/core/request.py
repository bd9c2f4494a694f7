"""Request: one sequence being generated (an n > 1 request is n of these sharing a group).

In: created by the engine from a prompt's token ids and SamplingParams. Out: read and updated
by the Scheduler (num_computed_tokens, output tokens, status) and the KV cache manager
(block ids). Holds no tensors except the optional per-request torch.Generator for sampling.
"""

from __future__ import annotations

import enum
import time

from anybit.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """A sequence: prompt + generated tokens, and how far the KV cache has computed them."""

    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "params", "status",
                 "num_computed_tokens", "num_cached_tokens", "arrival_time", "generator",
                 "eos_token_ids", "max_tokens", "stop_reason", "group_id", "index", "leader_id",
                 "num_preemptions", "logprobs", "prompt_logprobs", "block_hashes", "cumulative_logprob")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: set[int], max_tokens: int, generator=None, group_id: str | None = None,
                 index: int = 0, leader_id: str | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.arrival_time = time.monotonic()
        self.generator = generator
        self.eos_token_ids = eos_token_ids
        self.max_tokens = max_tokens
        self.stop_reason: int | str | None = None
        self.group_id = group_id or request_id
        self.index = index
        self.leader_id = leader_id  # n > 1: wait until this sibling has computed the prompt
        self.num_preemptions = 0
        self.logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] = []
        self.block_hashes: list[int] = []
        self.cumulative_logprob = 0.0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_range(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})")
