"""Offline API: ``LLM(model_path, ...).generate(prompts, SamplingParams(...))``.

In: a local model folder (None: the built-in default model) and engine options as keywords
(see anybit.config: dtype, max_model_len, block_size, kv_cache_dtype, kv_cache_memory,
max_num_seqs, max_num_batched_tokens, device, attention_backend, ...). Out: one RequestOutput
per prompt, in order; ``generate_stream`` yields outputs as tokens arrive.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from anybit.config import EngineConfig
from anybit.engine import LLMEngine
from anybit.outputs import RequestOutput
from anybit.sampling_params import SamplingParams

Prompt = str | list[int]

# Token budget per step when the caller gives none: offline work has no per-token latency to
# protect, and larger steps amortize each step's fixed cost (the decodes' attention and weight
# reads ride along in every mixed step). H100, 1000 requests of bench_throughput: 2048 -> 6617,
# 8192 -> 7493 output tok/s (s17-5, e2e_throughput_s17); 4096 7255, 16384 7713 (s17-3). The server
# keeps SchedulerConfig's 2048, which bounds how long a prefill chunk stalls running streams.
OFFLINE_MAX_NUM_BATCHED_TOKENS = 8192


def _resolve_model(model: str | None) -> str:
    if model is not None:
        return str(model)
    from anybit.default_model import default_model_path

    return default_model_path()


class LLM:
    def __init__(self, model: str | None = None, progress: bool = True, **engine_options):
        engine_options.setdefault("max_num_batched_tokens", OFFLINE_MAX_NUM_BATCHED_TOKENS)
        self.config = EngineConfig.create(_resolve_model(model), **engine_options)
        self.engine = LLMEngine.from_config(self.config, progress=progress)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """LLMEngine.reset_prefix_cache: drop the prefix cache between generate calls."""
        return self.engine.reset_prefix_cache()

    def _add(self, prompts: Prompt | Sequence[Prompt],
             params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        single_ids = isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        if isinstance(prompts, str) or single_ids:
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (batched with continuous batching); results in prompt order."""
        ids = self._add(prompts, params)
        final: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm)
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [final[rid] for rid in ids]

    def generate_stream(self, prompts: Prompt | Sequence[Prompt],
                        params: SamplingParams | Sequence[SamplingParams] | None = None
                        ) -> Iterator[RequestOutput]:
        """Yield RequestOutputs (with delta_text / delta_token_ids) as tokens are generated."""
        ids = self._add(prompts, params)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort_request(rid)
