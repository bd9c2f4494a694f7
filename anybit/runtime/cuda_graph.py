"""CUDA graphs for decode steps, one per batch-size bucket (two for small buckets: see below).

In: a decode-only batch (every sequence has one new token) from ModelRunner, and for async
scheduling the rows whose input id is a token the previous step sampled (still on the device).
Out: hidden states [num_seqs, hidden] computed by replaying the captured graph of the smallest
bucket that fits (padding rows write nowhere: slot -1, and read one token of block 0). Only
used with the Triton attention backend, whose decode path has no host syncs and sizes its grid
from ``max_seq_len`` (fixed to max_model_len at capture).

Short contexts: the full graph's decode attention is split for max_model_len (e.g. 64 splits of
128 tokens at 8192), so a short chat runs a split-K kernel whose other programs exit at once (8
sequences x 8 kv heads x 64 = 4096 programs) and a second kernel that merges one or two partials.
Buckets from SHORT_MIN_BATCH to SHORT_MAX_BATCH also get a graph captured with one split per
(sequence, kv head), which writes the output directly and launches no merge kernel; a step
replays it while every context (incl. the new token) is at most ``short_context`` tokens
(``ANYBIT_GRAPH_SHORT_CONTEXT``, default SHORT_CONTEXT; 0 = off). Measured on the H100 (s8-4, W4,
~130-220 token contexts): batch 8 graph 2.761 -> 2.689 ms; batch 1 level (2.393 vs 2.399 ms: its
one program per kv head walks the context serially, 9.5 us, as long as split kernel + merge), so
batch 1 keeps the full graph.

Inputs travel in two host->device copies per step (int64: input ids, positions, slots and the
in-flight rows/sources; int32: seq lens and the used block-table columns), from pinned staging
buffers that alternate between steps (a buffer is rewritten only after its last copy is done),
then the in-flight input ids are gathered on the device from the previous step's samples.
"""

from __future__ import annotations

import os

import torch

from anybit.layers.attention_meta import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SHORT_CONTEXT = 256  # contexts up to this many tokens replay the one-split graph
SHORT_MIN_BATCH, SHORT_MAX_BATCH = 2, 32  # buckets that get one


def short_context_limit(max_model_len: int) -> int:
    """Longest context that replays a one-split graph: ``ANYBIT_GRAPH_SHORT_CONTEXT`` (default
    SHORT_CONTEXT; 0 = no such graphs), 0 when it would cover max_model_len anyway."""
    raw = os.environ.get("ANYBIT_GRAPH_SHORT_CONTEXT", str(SHORT_CONTEXT))
    if not raw.isdigit():
        raise ValueError(f"ANYBIT_GRAPH_SHORT_CONTEXT: a token count >= 0, got {raw!r}")
    limit = int(raw)
    return limit if limit < max_model_len else 0


class _HostStaging:
    """Pinned host twins of the device input buffers (numpy views for fast filling) and the
    event of their last copy to the device."""

    def __init__(self, num_i64: int, num_i32: int, device: torch.device):
        pin = device.type == "cuda"
        self.i64 = torch.zeros(num_i64, dtype=torch.int64, pin_memory=pin)
        self.i32 = torch.zeros(num_i32, dtype=torch.int32, pin_memory=pin)
        self.i64_np = self.i64.numpy()
        self.i32_np = self.i32.numpy()
        self.device = device
        self.copied = torch.cuda.Event() if pin else None
        self.pending = False

    def wait_free(self) -> None:
        if self.pending:
            self.copied.synchronize()
            self.pending = False

    def mark_copied(self) -> None:
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(self.device))
            self.pending = True


class DecodeGraphRunner:
    def __init__(self, runner, max_batch: int | None = None):
        self.runner = runner
        self.enabled = runner.backend.name == "triton"
        limit = min(max_batch or runner.config.scheduler.max_num_seqs, BUCKETS[-1])
        self.buckets = [b for b in BUCKETS if b <= limit] or [1]
        if self.buckets[-1] < limit:
            self.buckets.append(limit)
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.short_context = short_context_limit(runner.max_model_len)
        # (bucket, short): graphs and their outputs; replays per key (tests, benchmarks)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.replays: dict[tuple[int, bool], int] = {}
        self.last_key: tuple[int, bool] | None = None
        self.pool = None
        self.captured = False
        dev = runner.device
        n = self.max_batch = self.buckets[-1]
        # int64 [5, n]: input_ids | positions | slot_mapping | in-flight rows | their sources
        self._i64 = torch.zeros(5, n, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping, self._inflight_rows, self._inflight_src = \
            self._i64.unbind(0)
        # int32 [n + n * max_blocks]: seq_lens | used block-table columns packed [num_seqs, width]
        self._i32 = torch.zeros(n + n * self.max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = self._i32[:n]
        self.block_table = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.slot_mapping.fill_(-1)
        self.seq_lens.fill_(1)
        self._staging = [_HostStaging(self._i64.numel(), self._i32.numel(), dev) for _ in range(2)]
        self._turn = 0

    def can_run(self, seqs) -> bool:
        if not self.enabled or len(seqs) > self.buckets[-1]:
            return False
        if not all(s.num_new_tokens == 1 and len(s.block_ids) <= self.max_blocks for s in seqs):
            return False
        if not self.captured:
            self.capture()
        return True

    def bucket(self, num_seqs: int) -> int:
        return next(x for x in self.buckets if x >= num_seqs)

    def graph_keys(self) -> list[tuple[int, bool]]:
        """(bucket, short) of every graph, largest bucket first."""
        return [(b, short) for b in reversed(self.buckets)
                for short in (False, True) if not short or self._short_bucket(b)]

    def _short_bucket(self, b: int) -> bool:
        return bool(self.short_context) and SHORT_MIN_BATCH <= b <= SHORT_MAX_BATCH

    def _meta(self, b: int, short: bool = False) -> AttentionMetadata:
        max_len = self.short_context if short else self.runner.max_model_len
        return AttentionMetadata(
            num_seqs=b, num_decodes=b, query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_table=self.block_table[:b], slot_mapping=self.slot_mapping[:b],
            max_query_len=1, max_seq_len=max_len, query_lens_cpu=[1] * b, seq_lens_cpu=[max_len] * b,
            decode_splits=1 if short else None)

    def _forward(self, b: int, short: bool = False) -> torch.Tensor:
        return self.runner.model(self.input_ids[:b], self.positions[:b], self.runner.kv_caches,
                                 self._meta(b, short))

    @torch.inference_mode()
    def capture(self) -> None:
        self.captured = True
        torch.cuda.synchronize()
        for key in self.graph_keys():  # largest first so smaller graphs reuse its memory pool
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the graph
                self._forward(*key)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(*key)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[key] = graph
            self.outputs[key] = out
        torch.cuda.synchronize()

    @torch.inference_mode()
    def prepare_inputs(self, seqs, inflight_rows: list[int] = (), inflight_sources: list[int] = (),
                       prev_sampled_ids: torch.Tensor | None = None) -> int:
        """Fill the graph's input buffers for ``seqs`` (decodes) and return the bucket size; the graph
        to replay (bucket, short) is left in ``last_key``.

        ``seqs[inflight_rows[i]]`` takes its input id from ``prev_sampled_ids[inflight_sources[i]]``
        (prev_sampled_ids [num_prev_samples] int64 on the device); the others from token_ids."""
        n, width = len(seqs), max(len(s.block_ids) for s in seqs)
        b, cap, bs = self.bucket(n), self.max_batch, self.runner.block_size
        ids, pos, slots, table = [], [], [], []
        for s in seqs:
            p = s.start_pos
            ids.append(0 if s.input_in_flight else s.token_ids[0])
            pos.append(p)
            slots.append(s.block_ids[p // bs] * bs + p % bs)
            table.extend(s.block_ids)
            table.extend([0] * (width - len(s.block_ids)))
        pad = b - n
        host = self._staging[self._turn]
        self._turn ^= 1
        host.wait_free()
        a, c = host.i64_np, host.i32_np
        a[0:b] = ids + [0] * pad
        a[cap:cap + b] = pos + [0] * pad
        a[2 * cap:2 * cap + b] = slots + [-1] * pad
        k = len(inflight_rows)
        a[3 * cap:3 * cap + k] = inflight_rows
        a[4 * cap:4 * cap + k] = inflight_sources
        c[0:b] = [p + 1 for p in pos] + [1] * pad
        c[cap:cap + n * width] = table
        self._i64.view(-1).copy_(host.i64, non_blocking=True)
        self._i32[:cap + n * width].copy_(host.i32[:cap + n * width], non_blocking=True)
        host.mark_copied()
        self.block_table[:n, :width].copy_(self._i32[cap:cap + n * width].view(n, width))
        if k:
            taken = prev_sampled_ids.index_select(0, self._inflight_src[:k])
            self.input_ids.index_copy_(0, self._inflight_rows[:k], taken)
        short = self._short_bucket(b) and max(pos) + 1 <= self.short_context
        self.last_key = (b, short)
        return b

    @torch.inference_mode()
    def run(self, seqs, inflight_rows: list[int] = (), inflight_sources: list[int] = (),
            prev_sampled_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.prepare_inputs(seqs, inflight_rows, inflight_sources, prev_sampled_ids)
        key = self.last_key
        self.graphs[key].replay()
        self.replays[key] = self.replays.get(key, 0) + 1
        return self.outputs[key][:len(seqs)]
