"""Triton attention backend: rotary, paged KV write and paged attention through anybit/kernels.

In: q/k/v projections ``[num_tokens, heads * head_dim]`` before rotary (may be strided views of a
fused QKV output), ``positions [num_tokens]``, this layer's ``LayerKVCache`` and the step's
``AttentionMetadata`` (decodes first). Out: ``[num_tokens, num_heads * head_dim]``.
Called by ``layers/attention.py`` (``Attention.forward``) when the backend is "triton".

The decode path does no host syncs and sizes its grid from host ints only (``max_seq_len``), so
it can be captured in a CUDA graph. Rotary is applied in place on the q/k projections, in the same
launch that writes K/V into the cache (``kernels/rope.py: rotary_and_cache``).
"""

from __future__ import annotations

import torch

from anybit.kernels.attention_decode import paged_attention_decode
from anybit.kernels.attention_prefill import paged_attention_prefill
from anybit.kernels.rope import rotary_and_cache
from anybit.layers.attention_meta import AttentionMetadata, LayerKVCache
from anybit.layers.pending import PendingSum


def _heads(x: torch.Tensor, num_tokens: int, heads: int, head_dim: int) -> torch.Tensor:
    """[num_tokens, heads * head_dim] (any row stride) -> [num_tokens, heads, head_dim] view."""
    if x.dim() == 3:
        return x
    try:
        return x.view(num_tokens, heads, head_dim)
    except RuntimeError:
        return x.reshape(num_tokens, heads, head_dim)


class TritonAttentionBackend:
    """AttentionBackend on CUDA: fused rope + cache write -> split-K decode + varlen prefill."""

    name = "triton"

    def accepts_pending(self, layer) -> bool:
        """Whether ``forward`` takes the QKV projection as one PendingSum (full-width rotary)."""
        return layer.rotary.cos_sin_cache.shape[-1] == layer.head_dim

    def forward(self, layer, query, key: torch.Tensor | None, value: torch.Tensor | None,
                positions: torch.Tensor, kv_cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        """query / key / value projections, or ``query`` a PendingSum of the fused QKV projection
        ``[num_tokens, (nh + 2 nkv) hd]`` (key / value None): the rotary kernel then reads it."""
        num_tokens = query.shape[0]
        nh, nkv, hd = layer.num_heads, layer.num_kv_heads, layer.head_dim
        acc = None
        if isinstance(query, PendingSum):
            pending = query
            sizes = [nh * hd, nkv * hd, nkv * hd]
            qkv = torch.empty(pending.shape, dtype=pending.dtype, device=pending.acc.device)
            query, key, value = qkv.split(sizes, dim=-1)
            acc = tuple(_heads(a, num_tokens, n, hd) for a, n in zip(pending.acc.split(sizes, dim=-1),
                                                                      (nh, nkv, nkv), strict=True))
        q = _heads(query, num_tokens, nh, hd)
        k = _heads(key, num_tokens, nkv, hd)
        v = _heads(value, num_tokens, nkv, hd)
        # one launch: rotary on q/k (in place) + K/V write (quantize-on-write) into the paged cache
        rot = layer.rotary
        slots = meta.slot_mapping
        q, k = rotary_and_cache(positions, q, k, v, rot.cos_sin_cache, rot.is_neox, kv_cache, slots, acc=acc)
        if acc is not None:
            pending.consumed()
        out = torch.empty(num_tokens, nh, hd, dtype=q.dtype, device=q.device)
        nd = meta.num_decodes
        if nd > 0:
            # Split sizing uses meta.max_seq_len only (a host int): a CUDA-graph runner sets it to the
            # largest context the graph replays with; longer contexts stay correct, just slower.
            paged_attention_decode(q[:nd], kv_cache, meta.seq_lens[:nd], meta.block_table[:nd], layer.scale,
                                   layer.sliding_window, meta.max_seq_len, out=out[:nd],
                                   num_splits=meta.decode_splits)
        if meta.num_seqs > nd:
            # query_start_loc stays absolute: the kernel indexes rows of the full q/out directly.
            paged_attention_prefill(q, kv_cache, meta.query_start_loc[nd:], meta.seq_lens[nd:],
                                    meta.block_table[nd:], layer.scale, layer.sliding_window,
                                    meta.max_query_len, meta.max_seq_len, out=out)
        return out.view(num_tokens, nh * hd)
