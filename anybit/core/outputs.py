"""The only types that cross between the scheduler (core/) and the model runner (runtime/).

SchedulerOutput: what to compute this step, per sequence. RunnerOutput: what came back.
EngineCoreOutput: per-request progress handed to the engine (detokenization, streaming).

Async scheduling: a ScheduledSeq with ``input_in_flight`` is a decode whose input token is the
one the previous step sampled for the same request, not yet read by the host; its
``token_ids`` is ``[PLACEHOLDER_TOKEN]`` and the runner takes the real id from the previous
step's device tensor. Its ``output_token_ids`` lacks that token (``num_output_tokens`` counts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from anybit.sampling_params import SamplingParams

PLACEHOLDER_TOKEN = -1  # input id of an in-flight decode (see module docstring)


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's work in a step: tokens [start_pos, start_pos + len(token_ids))."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool  # True when this chunk reaches the end of the known tokens
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    prompt_logprobs: bool  # return logprobs of the prompt tokens in this chunk
    num_prompt_tokens: int
    input_in_flight: bool = False  # token_ids[0] is the previous step's not yet read sample

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens before this step's sample, the in-flight one included."""
        return len(self.output_token_ids) + self.input_in_flight

    @property
    def seq_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None  # includes the sampled token


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, SampledToken]  # request_id -> token, for seqs with sample=True
    # request_id -> per prompt token (positions start_pos+1 .. of the chunk) {token: logprob}
    prompt_logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # complete, once prefill ends
    num_cached_tokens: int = 0
