"""Per-request sampling parameters.

`SamplingParams` is what a user (offline API, CLI or server) gives for one request. It is
validated once, in `__post_init__`; every bad value raises `ValueError("<field>: <problem>,
allowed ...")` so the server can turn it into an OpenAI 400 error naming the parameter.

Consumers: the scheduler (max_tokens, min_tokens, stop_token_ids, ignore_eos, n), the sampler
(`anybit.runtime.sampler.SamplingBatch.build`), and the detokenizer (stop strings,
skip_special_tokens, include_stop_str_in_output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# Temperatures below this are treated as greedy (argmax): dividing logits by a tiny temperature
# overflows float32 and gives the same result as argmax anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int | None, hi: int | None, allowed: str) -> None:
    if not _is_int(value):
        raise ValueError(
            f"{name}: expected an integer, got {type(value).__name__} {value!r}; allowed {allowed}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}: {value} is out of range, allowed {allowed}")


def _check_float(name: str, value: object, ok, allowed: str) -> float:
    if not _is_number(value):
        raise ValueError(
            f"{name}: expected a number, got {type(value).__name__} {value!r}; allowed {allowed}")
    value = float(value)
    if math.isnan(value) or math.isinf(value) or not ok(value):
        raise ValueError(f"{name}: {value} is out of range, allowed {allowed}")
    return value


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(
            f"{name}: expected a boolean, got {type(value).__name__} {value!r}; allowed true/false")


@dataclass
class SamplingParams:
    """How to sample the continuation of one prompt.

    Fields (defaults follow vLLM / the OpenAI API):
      n: number of completions for the prompt (>= 1); they share the prompt's KV blocks.
      temperature: >= 0; 0 (or < 1e-5) means greedy argmax.
      top_p: nucleus sampling mass in (0, 1]; 1 = off.
      top_k: keep the k most likely tokens; 0 or -1 = off.
      min_p: drop tokens with prob < min_p * max prob, in [0, 1]; 0 = off.
      repetition_penalty: > 0, 1 = off (HF/CTRL style, on prompt and output tokens).
      presence_penalty, frequency_penalty: in [-2, 2] (OpenAI style, on output tokens).
      seed: int or None; with a seed the request draws from its own generator, so the same seed
        gives the same output whatever else is in the batch. For n > 1, completion i uses
        `child_seed(i)` = seed + i.
      max_tokens: max generated tokens (>= 1), None = up to the context limit.
      min_tokens: EOS and stop_token_ids are masked until this many tokens were generated
        (stop strings are not checked before either).
      stop: stop strings (a str is wrapped into a list); never in the output text unless
        include_stop_str_in_output.
      stop_token_ids: token ids that finish the request (in addition to EOS).
      ignore_eos: keep generating after EOS (benchmarks).
      logprobs: None = no logprobs; k >= 0 = logprob of the sampled token plus the top k (<= 20).
      prompt_logprobs: None or k in [0, 20]: logprobs of the prompt tokens (echo / scoring).
      skip_special_tokens: drop special tokens from the output text.
      include_stop_str_in_output: keep the matched stop string at the end of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, None, "integers >= 1")
        self.temperature = _check_float("temperature", self.temperature, lambda v: v >= 0, "numbers >= 0")
        self.top_p = _check_float("top_p", self.top_p, lambda v: 0 < v <= 1, "numbers in (0, 1]")
        _check_int("top_k", self.top_k, -1, None, "-1 or 0 (off) or integers >= 1")
        self.min_p = _check_float("min_p", self.min_p, lambda v: 0 <= v <= 1, "numbers in [0, 1]")
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, lambda v: v > 0, "numbers > 0 (1 = off)")
        self.presence_penalty = _check_float(
            "presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "numbers in [-2, 2]")
        self.frequency_penalty = _check_float(
            "frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2, "numbers in [-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**64 - 1, "null or integers in [-2^63, 2^64)")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None, "null or integers >= 1")
        _check_int("min_tokens", self.min_tokens, 0, None, "integers >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens: {self.min_tokens} is larger than max_tokens={self.max_tokens}, "
                "allowed 0 <= min_tokens <= max_tokens")
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        _check_bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, f"null or integers in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS,
                       f"null or integers in [0, {MAX_LOGPROBS}]")
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)

    @staticmethod
    def _normalize_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop: expected a string or a list of strings, got {type(stop).__name__}; "
                             "allowed a string or a list of non-empty strings")
        out = []
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: {s!r} is not a non-empty string, allowed a string or a list of "
                                 "non-empty strings")
            if s not in out:
                out.append(s)
        return out

    @staticmethod
    def _normalize_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple, set)):
            raise ValueError(f"stop_token_ids: expected a list of integers, got {type(ids).__name__}; "
                             "allowed a list of integers >= 0")
        out = []
        for t in ids:
            _check_int("stop_token_ids", t, 0, None, "a list of integers >= 0")
            out.append(int(t))
        return out

    # ---- derived properties -------------------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        """True when the request takes the argmax (temperature 0 or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_top_p(self) -> bool:
        return self.top_p < 1.0

    @property
    def uses_min_p(self) -> bool:
        return self.min_p > 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def child_seed(self, index: int) -> int | None:
        """Seed of completion `index` of an n > 1 request (seed + index), None without a seed."""
        if self.seed is None:
            return None
        return self.seed + index

    def clone(self, **changes) -> SamplingParams:
        """A validated copy with some fields changed."""
        return replace(self, **changes)
