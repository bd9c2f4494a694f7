"""Model runner: turns a SchedulerOutput into tensors, runs the model, samples.

In: ``execute(SchedulerOutput)``. Out: ``RunnerOutput`` (one sampled token per sequence whose
chunk reached the end of its known tokens, plus prompt logprobs where asked). Owns the model,
the KV caches and the sampler. Called by EngineCore.

``execute`` is ``collect(launch(sched))``. Async scheduling calls the two apart:
``launch(sched, prev)`` queues the step on the device without waiting for anything (the
results start their copy to pinned host memory, a CUDA event marks their arrival) and returns a
``LaunchedStep``; sequences with ``input_in_flight`` take their input id from ``prev``'s sampled
tokens on the device. ``collect(step)`` waits for the event and builds the RunnerOutput.

Batch layout: sequences whose chunk has one token (decodes) come first, then prefill chunks;
all tokens are flattened into one [num_tokens] batch (see AttentionMetadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from anybit.config import EngineConfig
from anybit.core.outputs import RunnerOutput, SampledToken, ScheduledSeq, SchedulerOutput
from anybit.layers.attention import get_attention_backend
from anybit.layers.attention_meta import AttentionMetadata
from anybit.models.arch import ArchConfig
from anybit.runtime import kv_cache as kvc
from anybit.runtime.loader import load_hf_config, load_model, resolve_model_dtype
from anybit.runtime.sampler import Sampler, SamplingBatch, compute_prompt_logprobs


def cpu_threads(requested: int | None, arch: ArchConfig) -> int:
    """Torch threads for the CPU path. Small models run many tiny operations per step, where
    thread fork/join costs more than it saves (and a busy machine makes each wait a scheduler
    time slice: 6 tok/s with 2 threads vs 42 with 1 for the default model on a loaded 2-core
    machine), so the default is about one thread per 1024 of hidden size, capped by the cores."""
    if requested is not None:
        return requested
    return max(1, min(os.cpu_count() or 1, arch.hidden_size // 1024))


@dataclass(slots=True)
class _PromptLogprobs:
    """One chunk's prompt logprobs on their way to the host: token_lps [count] float32,
    top_ids / top_lps [count, k] (None when k == 0)."""

    seq: ScheduledSeq
    next_token_ids: list[int]
    token_lps: torch.Tensor
    top_ids: torch.Tensor | None
    top_lps: torch.Tensor | None


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device, read by ``ModelRunner.collect``.

    sample_seqs: the sequences that sample, in the row order of the tensors below.
    sampled_ids [num_sample_seqs] int64 on the device: the next step's in-flight inputs.
    host_ids / host_lps [num_sample_seqs], host_top_ids / host_top_lps [num_sample_seqs, k]:
    host copies in flight (pinned memory on CUDA), valid once ``ready`` has completed.
    """

    sample_seqs: list[ScheduledSeq]
    sampled_ids: torch.Tensor | None = None
    host_ids: torch.Tensor | None = None
    host_lps: torch.Tensor | None = None
    host_top_ids: torch.Tensor | None = None
    host_top_lps: torch.Tensor | None = None
    prompt_logprobs: list[_PromptLogprobs] = field(default_factory=list)
    ready: torch.cuda.Event | None = None
    _rows: dict[str, int] | None = None

    def row_of(self, request_id: str) -> int:
        """Row of ``request_id`` in ``sampled_ids``."""
        if self._rows is None:
            self._rows = {s.request_id: row for row, s in enumerate(self.sample_seqs)}
        row = self._rows.get(request_id)
        if row is None:
            raise RuntimeError(f"{request_id}: its input token is in flight but the previous step did not "
                               "sample it")
        return row


def inflight_sources(seqs: list[ScheduledSeq], prev: LaunchedStep | None) -> tuple[list[int], list[int]]:
    """(rows, sources): decode ``seqs[rows[i]]`` (decodes come first, so its row is also its
    token index) takes its input id from ``prev.sampled_ids[sources[i]]``."""
    rows = [i for i, s in enumerate(seqs) if s.input_in_flight]
    if rows and prev is None:
        raise RuntimeError("a sequence's input token is in flight but no previous step was given")
    return rows, [prev.row_of(seqs[i].request_id) for i in rows]


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        self.device = config.device.torch_device()
        hf_config = load_hf_config(config.model.model)
        arch = ArchConfig.from_hf(hf_config)
        self.dtype = resolve_model_dtype(config.model.dtype, arch, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(config.device.cpu_threads, arch))
        self.max_model_len = config.model.max_model_len or arch.max_position_embeddings
        torch.manual_seed(config.model.seed)
        self.backend = get_attention_backend(config.device.attention_backend, self.device)
        self.model, self.arch = load_model(config.model.model, self.dtype, self.device, self.backend,
                                           self.max_model_len, hf_config=hf_config, progress=progress,
                                           load_format=config.model.load_format)
        self.block_size = config.cache.block_size
        self.kv_dtype = kvc.resolve_kv_dtype(config.cache, self.dtype)
        sched = config.scheduler
        max_useful = sched.max_num_seqs * -(-self.max_model_len // self.block_size) + 1
        reserve = kvc.activation_reserve(self.arch, sched.max_num_batched_tokens, sched.max_num_seqs,
                                         self.dtype)
        self.num_blocks = kvc.compute_num_blocks(self.arch, config.cache, self.kv_dtype, self.device,
                                                 reserve, max_useful)
        self.kv_caches = kvc.allocate_kv_caches(self.arch, self.num_blocks, self.block_size,
                                                self.kv_dtype, self.device)
        self.sampler = Sampler()
        self.vocab_size = self.arch.vocab_size
        self.eos_token_ids: set[int] = set(self.arch.eos_token_ids)  # the engine adds the tokenizer's
        self.graph_runner = None
        if self.device.type == "cuda" and not config.device.enforce_eager:
            try:
                from anybit.runtime.cuda_graph import DecodeGraphRunner
            except ImportError:
                DecodeGraphRunner = None
            if DecodeGraphRunner is not None:
                self.graph_runner = DecodeGraphRunner(self)

    # ---- inputs --------------------------------------------------------------------------
    def prepare(self, seqs: list[ScheduledSeq]):
        """Flatten the sequences (already ordered decodes first) into model inputs."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        max_blocks = max(len(s.block_ids) for s in seqs)
        table = []
        for s in seqs:
            n = s.num_new_tokens
            input_ids.extend(s.token_ids)
            pos = range(s.start_pos, s.start_pos + n)
            positions.extend(pos)
            blocks = s.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + n)
            seq_lens.append(s.seq_len)
            query_lens.append(n)
            table.append(blocks + [0] * (max_blocks - len(blocks)))
        dev = self.device

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device="cpu").to(dev, non_blocking=True)

        num_decodes = 0
        for q in query_lens:
            if q != 1:
                break
            num_decodes += 1
        meta = AttentionMetadata(
            num_seqs=len(seqs), num_decodes=num_decodes, query_start_loc=t(qsl, torch.int32),
            seq_lens=t(seq_lens, torch.int32), block_table=t(table, torch.int32),
            slot_mapping=t(slots, torch.int64), max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return t(input_ids, torch.int64), t(positions, torch.int64), meta

    def to_device_index(self, values: list[int]) -> torch.Tensor:
        """int64 index tensor on the device from a host list, through pinned memory on CUDA (a
        copy from pageable memory could wait for the device)."""
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def rows_of(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """hidden[rows] without a host sync: a slice when the rows are consecutive."""
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
            return hidden[rows[0]:rows[0] + len(rows)]
        return hidden.index_select(0, self.to_device_index(rows))

    def _to_host(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Start the copy of ``t`` to (pinned) host memory; valid after the step's event."""
        if t is None or t.device.type == "cpu":
            return t
        return t.to("cpu", non_blocking=True)

    # ---- step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        return self.collect(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the forward pass, sampling and the copies of the results to the host; no wait
        on the device. ``prev``: the step whose sampled tokens feed ``input_in_flight`` seqs."""
        seqs = sorted(sched.seqs, key=lambda s: s.num_new_tokens != 1)  # stable: decodes first
        rows, sources = inflight_sources(seqs, prev)
        if self.graph_runner is not None and self.graph_runner.can_run(seqs):
            hidden = self.graph_runner.run(seqs, rows, sources, prev.sampled_ids if rows else None)
            qsl = list(range(len(seqs) + 1))
        else:
            input_ids, positions, meta = self.prepare(seqs)
            if rows:
                input_ids.index_copy_(0, self.to_device_index(rows),
                                      prev.sampled_ids.index_select(0, self.to_device_index(sources)))
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            qsl = [0]
            for s in seqs:
                qsl.append(qsl[-1] + s.num_new_tokens)
        step = LaunchedStep(sample_seqs=[s for s in seqs if s.sample])
        if step.sample_seqs:
            sample_rows = [qsl[i + 1] - 1 for i, s in enumerate(seqs) if s.sample]
            self._sample(step, self.rows_of(hidden, sample_rows), prev)
        for i, s in enumerate(seqs):
            if s.prompt_logprobs:
                step.prompt_logprobs.append(self._launch_prompt_logprobs(s, hidden[qsl[i]:qsl[i + 1]]))
        if self.device.type == "cuda":
            step.ready = torch.cuda.Event()
            step.ready.record(torch.cuda.current_stream(self.device))
        return step

    def _sample(self, step: LaunchedStep, hidden: torch.Tensor, prev: LaunchedStep | None) -> None:
        """Logits and sampler for ``step.sample_seqs`` (hidden [num_sample_seqs, hidden])."""
        seqs = step.sample_seqs
        logits = self.model.compute_logits(hidden).float()
        batch = SamplingBatch.build(
            [s.params for s in seqs], [s.generator for s in seqs], [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs], self.vocab_size, self.device,
            eos_token_ids=self.eos_token_ids, num_output_tokens=[s.num_output_tokens for s in seqs],
            pending_output_ids=self._pending_outputs(seqs, prev))
        result = self.sampler(logits, batch)
        step.sampled_ids = result.sampled_token_ids
        step.host_ids = self._to_host(result.sampled_token_ids)
        step.host_lps = self._to_host(result.sampled_logprobs)
        step.host_top_ids = self._to_host(result.top_logprob_ids)
        step.host_top_lps = self._to_host(result.top_logprobs)

    def _pending_outputs(self, seqs: list[ScheduledSeq], prev: LaunchedStep | None):
        """(rows [k], token ids [k]) on the device: sampling rows whose last output token is
        still in flight, and that token, for penalties; None when no row needs them."""
        rows = [r for r, s in enumerate(seqs) if s.input_in_flight and s.params.uses_penalties]
        if not rows:
            return None
        sources = [prev.row_of(seqs[r].request_id) for r in rows]
        return self.to_device_index(rows), prev.sampled_ids.index_select(0, self.to_device_index(sources))

    @torch.inference_mode()
    def collect(self, step: LaunchedStep) -> RunnerOutput:
        """Wait for ``step``'s results and turn them into host values."""
        if step.ready is not None:
            step.ready.synchronize()
        out = RunnerOutput(sampled={})
        if step.sample_seqs:
            self._collect_samples(step, out)
        for p in step.prompt_logprobs:
            out.prompt_logprobs[p.seq.request_id] = self._collect_prompt_logprobs(p)
        return out

    def _collect_samples(self, step: LaunchedStep, out: RunnerOutput) -> None:
        ids = step.host_ids.tolist()
        lps = step.host_lps.tolist() if step.host_lps is not None else None
        top_ids = step.host_top_ids.tolist() if step.host_top_ids is not None else None
        top_lps = step.host_top_lps.tolist() if step.host_top_lps is not None else None
        for row, s in enumerate(step.sample_seqs):
            token = SampledToken(ids[row])
            if s.params.logprobs is not None and lps is not None:
                token.logprob = lps[row]
                k = s.params.logprobs
                token.top_logprobs = dict(zip(top_ids[row][:k], top_lps[row][:k])) if k and top_ids else {}
            out.sampled[s.request_id] = token

    def _launch_prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> _PromptLogprobs:
        """Logprobs of the prompt tokens this chunk predicts: row j of the chunk (position
        start_pos + j) predicts token start_pos + j + 1."""
        end = min(s.seq_len + 1, s.num_prompt_tokens)
        count = max(0, end - (s.start_pos + 1))
        next_list = s.prompt_token_ids[s.start_pos + 1:s.start_pos + 1 + count]
        if count == 0:
            empty = torch.empty(0)
            return _PromptLogprobs(s, [], empty, None, None)
        logits = self.model.compute_logits(hidden[:count]).float()
        next_ids = self.to_device_index(next_list)
        token_lps, top_ids, top_lps = compute_prompt_logprobs(logits, next_ids, s.params.prompt_logprobs)
        return _PromptLogprobs(s, next_list, self._to_host(token_lps), self._to_host(top_ids),
                               self._to_host(top_lps))

    @staticmethod
    def _collect_prompt_logprobs(p: _PromptLogprobs) -> list[dict[int, float]]:
        token_lps = p.token_lps.tolist()
        top_ids = p.top_ids.tolist() if p.top_ids is not None else None
        top_lps = p.top_lps.tolist() if p.top_lps is not None else None
        entries = []
        for j, token in enumerate(p.next_token_ids):
            d = {}
            if top_ids is not None:
                d.update(zip(top_ids[j], top_lps[j]))
            d[token] = token_lps[j]
            entries.append(d)
        return entries
