"""CUDA graphs for decode steps, one per batch-size bucket.

In: a decode-only batch (every sequence has one new token) from ModelRunner. Out: hidden
states [num_seqs, hidden] computed by replaying the captured graph of the smallest bucket that
fits (padding rows write nowhere: slot -1, and read one token of block 0). Only used with the
Triton attention backend, whose decode path has no host syncs and sizes its grid from
``max_seq_len`` (fixed to max_model_len at capture).
"""

from __future__ import annotations

import torch

from anybit.layers.attention_meta import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphRunner:
    def __init__(self, runner, max_batch: int | None = None):
        self.runner = runner
        self.enabled = runner.backend.name == "triton"
        limit = min(max_batch or runner.config.scheduler.max_num_seqs, BUCKETS[-1])
        self.buckets = [b for b in BUCKETS if b <= limit] or [1]
        if self.buckets[-1] < limit:
            self.buckets.append(limit)
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.captured = False
        dev = runner.device
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)

    def can_run(self, seqs) -> bool:
        if not self.enabled or len(seqs) > self.buckets[-1]:
            return False
        if not all(s.num_new_tokens == 1 and len(s.block_ids) <= self.max_blocks for s in seqs):
            return False
        if not self.captured:
            self.capture()
        return True

    def _meta(self, b: int) -> AttentionMetadata:
        max_len = self.runner.max_model_len
        return AttentionMetadata(
            num_seqs=b, num_decodes=b, query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_table=self.block_table[:b], slot_mapping=self.slot_mapping[:b],
            max_query_len=1, max_seq_len=max_len, query_lens_cpu=[1] * b, seq_lens_cpu=[max_len] * b)

    def _forward(self, b: int) -> torch.Tensor:
        return self.runner.model(self.input_ids[:b], self.positions[:b], self.runner.kv_caches, self._meta(b))

    @torch.inference_mode()
    def capture(self) -> None:
        self.captured = True
        torch.cuda.synchronize()
        for b in reversed(self.buckets):  # largest first so smaller graphs reuse its memory pool
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the graph
                self._forward(b)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
            self.outputs[b] = out
        torch.cuda.synchronize()

    @torch.inference_mode()
    def run(self, seqs) -> torch.Tensor:
        n = len(seqs)
        b = next(x for x in self.buckets if x >= n)
        bs = self.runner.block_size
        ids, pos, slots, lens, rows = [], [], [], [], []
        width = max(len(s.block_ids) for s in seqs)
        for s in seqs:
            p = s.start_pos
            ids.append(s.token_ids[0])
            pos.append(p)
            slots.append(s.block_ids[p // bs] * bs + p % bs)
            lens.append(p + 1)
            rows.append(s.block_ids + [0] * (width - len(s.block_ids)))
        pad = b - n
        ids += [0] * pad
        pos += [0] * pad
        slots += [-1] * pad
        lens += [1] * pad
        self.input_ids[:b].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(pos), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots), non_blocking=True)
        self.seq_lens[:b].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        self.block_table[:n, :width].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b][:n]
