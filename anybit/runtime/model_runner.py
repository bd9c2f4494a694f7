"""Model runner: turns a SchedulerOutput into tensors, runs the model, samples.

In: ``execute(SchedulerOutput)``. Out: ``RunnerOutput`` (one sampled token per sequence whose
chunk reached the end of its known tokens, plus prompt logprobs where asked). Owns the model,
the KV caches and the sampler. Called by EngineCore.

Batch layout: sequences whose chunk has one token (decodes) come first, then prefill chunks;
all tokens are flattened into one [num_tokens] batch (see AttentionMetadata).
"""

from __future__ import annotations

import os

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

    # ---- step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        seqs = sorted(sched.seqs, key=lambda s: s.num_new_tokens != 1)  # stable: decodes first
        if self.graph_runner is not None and self.graph_runner.can_run(seqs):
            hidden = self.graph_runner.run(seqs)
            meta_qsl = list(range(len(seqs) + 1))
        else:
            input_ids, positions, meta = self.prepare(seqs)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            meta_qsl = [0]
            for s in seqs:
                meta_qsl.append(meta_qsl[-1] + s.num_new_tokens)
        out = RunnerOutput(sampled={})
        # rows of hidden whose logits we need: last token of sampling seqs + prompt-logprob chunks
        sample_rows = [meta_qsl[i + 1] - 1 for i, s in enumerate(seqs) if s.sample]
        sample_seqs = [s for s in seqs if s.sample]
        if sample_seqs:
            logits = self.model.compute_logits(hidden[sample_rows]).float()
            batch = SamplingBatch.build(
                [s.params for s in sample_seqs], [s.generator for s in sample_seqs],
                [s.prompt_token_ids for s in sample_seqs], [s.output_token_ids for s in sample_seqs],
                self.vocab_size, self.device, eos_token_ids=self.eos_token_ids)
            result = self.sampler(logits, batch)
            self._collect_samples(sample_seqs, result, out)
        for i, s in enumerate(seqs):
            if s.prompt_logprobs:
                self._prompt_logprobs(s, hidden[meta_qsl[i]:meta_qsl[i + 1]], out)
        return out

    def _collect_samples(self, seqs, result, out: RunnerOutput) -> None:
        ids = result.sampled_token_ids.tolist()
        lps = result.sampled_logprobs.tolist() if result.sampled_logprobs is not None else None
        top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        for row, s in enumerate(seqs):
            token = SampledToken(ids[row])
            if s.params.logprobs is not None and lps is not None:
                token.logprob = lps[row]
                k = s.params.logprobs
                token.top_logprobs = dict(zip(top_ids[row][:k], top_lps[row][:k])) if k and top_ids else {}
            out.sampled[s.request_id] = token

    def _prompt_logprobs(self, s: ScheduledSeq, hidden, out: RunnerOutput) -> None:
        # row j of the chunk (position start_pos + j) predicts token start_pos + j + 1
        end = min(s.seq_len + 1, s.num_prompt_tokens)
        count = end - (s.start_pos + 1)
        if count <= 0:
            out.prompt_logprobs[s.request_id] = []
            return
        logits = self.model.compute_logits(hidden[:count]).float()
        next_list = s.prompt_token_ids[s.start_pos + 1:end]
        next_ids = torch.tensor(next_list, device=logits.device)
        token_lps, top_ids, top_lps = compute_prompt_logprobs(logits, next_ids, s.params.prompt_logprobs)
        token_lps = token_lps.tolist()
        top_ids = top_ids.tolist() if top_ids is not None else None
        top_lps = top_lps.tolist() if top_lps is not None else None
        entries = []
        for j in range(count):
            d = {}
            if top_ids is not None:
                d.update(zip(top_ids[j], top_lps[j]))
            d[next_list[j]] = token_lps[j]
            entries.append(d)
        out.prompt_logprobs[s.request_id] = entries
