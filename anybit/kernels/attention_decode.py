"""Paged decode attention: one query token per sequence against its paged context.

Flash-Decoding (Dao et al. 2023): the context is split across programs (split-K), each computes
a partial softmax (max, sum, weighted V) and a reduction kernel merges them. GQA-aware: one
program handles all query heads of a kv head, so every KV block is read once per group.
``seq_lens[i]`` counts the context including this step's token, whose K/V is already cached; the
query sits at position ``seq_len - 1``.
"""

from __future__ import annotations

import torch

from anybit.kernels.attention_prefill import _check_attn_args, ref_attend
from anybit.kernels.kv_cache_ops import gather_kv
from anybit.layers.attention_meta import LayerKVCache


def ref_paged_attention_decode(query: torch.Tensor, kv_cache: LayerKVCache, seq_lens: torch.Tensor,
                               block_table: torch.Tensor, scale: float, sliding_window, max_seq_len: int,
                               seq_lens_cpu: list[int] | None = None) -> torch.Tensor:
    """query ``[num_seqs, num_heads, head_dim]`` -> out, same shape and dtype.

    seq_lens ``[num_seqs]`` int32; block_table ``[num_seqs, max_blocks_per_seq]`` int32.
    """
    _check_attn_args(query, kv_cache, block_table, "paged_attention_decode")
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    out = torch.empty_like(query)
    for i, slen in enumerate(seq_lens_cpu):
        k, v = gather_kv(kv_cache, block_table[i], slen)
        out[i] = ref_attend(query[i:i + 1], k, v, scale, sliding_window)[0].to(query.dtype)
    return out
