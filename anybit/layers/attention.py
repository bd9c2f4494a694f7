"""Attention module and backend choice.

In: q/k/v projections [num_tokens, heads * head_dim] before rotary, ``positions``, this layer's
``LayerKVCache`` and the step's ``AttentionMetadata``. Out: [num_tokens, num_heads * head_dim].
The backend applies rotary, writes K/V into the paged cache and attends (decode sequences
first, then prefill chunks). ``TorchAttentionBackend`` is the reference used on CPU and in CI;
the Triton backend lives in attention_triton.py.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from anybit.layers.attention_meta import AttentionMetadata, LayerKVCache
from anybit.layers.rotary import RotaryEmbedding


class AttentionBackend(Protocol):
    name: str

    def forward(self, layer: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                positions: torch.Tensor, kv_cache: LayerKVCache, meta: AttentionMetadata) -> torch.Tensor:
        ...


class TorchAttentionBackend:
    """Reference backend built from the ``ref_`` functions of anybit/kernels."""

    name = "torch"

    def forward(self, layer, query, key, value, positions, kv_cache, meta):
        from anybit.kernels.attention_prefill import ref_paged_attention_prefill
        from anybit.kernels.kv_cache_ops import ref_reshape_and_cache
        from anybit.kernels.rope import ref_rotary_embedding

        num_tokens = query.shape[0]
        q = query.view(num_tokens, layer.num_heads, layer.head_dim)
        k = key.view(num_tokens, layer.num_kv_heads, layer.head_dim)
        v = value.view(num_tokens, layer.num_kv_heads, layer.head_dim)
        q, k = ref_rotary_embedding(positions, q, k, layer.rotary.cos_sin_cache, layer.rotary.is_neox)
        ref_reshape_and_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd > 0:
            out[:nd] = batched_decode(q[:nd], kv_cache, meta.block_table[:nd], meta.seq_lens_cpu[:nd],
                                      layer.scale, layer.sliding_window)
        if meta.num_seqs > nd:
            qsl = meta.query_start_loc[nd:] - nd
            out[nd:] = ref_paged_attention_prefill(
                q[nd:], kv_cache, qsl, meta.seq_lens[nd:], meta.block_table[nd:], layer.scale,
                layer.sliding_window, meta.max_query_len, meta.max_seq_len,
                query_lens_cpu=meta.query_lens_cpu[nd:], seq_lens_cpu=meta.seq_lens_cpu[nd:])
        return out.view(num_tokens, layer.num_heads * layer.head_dim)


def batched_decode(query: torch.Tensor, kv_cache: LayerKVCache, block_table: torch.Tensor,
                   seq_lens_cpu: list[int], scale: float, sliding_window: int | None) -> torch.Tensor:
    """All decode sequences at once (torch path): gather every context padded to the longest,
    mask the padding (and the window), one batched softmax. Same math as
    ``ref_paged_attention_decode``, a few ops per layer instead of a few per sequence.

    query [num_seqs, num_heads, head_dim] -> [num_seqs, num_heads, head_dim] in query's dtype.
    """
    from anybit.kernels.kv_cache_ops import ref_dequantize_kv

    num_seqs, num_heads, head_dim = query.shape
    max_len = max(seq_lens_cpu)
    nb = -(-max_len // kv_cache.block_size)
    blocks = block_table[:, :nb].long()

    def take(t):
        return None if t is None else t[blocks].flatten(1, 2)[:, :max_len]

    k = ref_dequantize_kv(take(kv_cache.key), take(kv_cache.key_scale), take(kv_cache.key_zero),
                          kv_cache.dtype)
    v = ref_dequantize_kv(take(kv_cache.value), take(kv_cache.value_scale), take(kv_cache.value_zero),
                          kv_cache.dtype)
    lens = torch.tensor(seq_lens_cpu, device=query.device).unsqueeze(1)
    pos = torch.arange(max_len, device=query.device).unsqueeze(0)
    visible = pos < lens
    if sliding_window:
        visible &= pos > lens - 1 - sliding_window
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float().unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=True)  # [num_seqs, heads, 1, d]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """'auto' -> triton on CUDA, torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention_backend: 'triton' needs a CUDA device; use 'torch' on CPU")
        from anybit.layers.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend: got {name!r}, allowed: auto, torch, triton")


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the paged KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding,
                 backend: AttentionBackend, sliding_window: int | None = None, scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.sliding_window = sliding_window
        self.rotary = rotary
        self.backend = backend

    def accepts_pending(self) -> bool:
        """Whether ``forward(qkv_pending, None, None, ...)`` is possible: the backend reads a fused
        QKV projection left as a PendingSum (anybit/layers/pending.py)."""
        check = getattr(self.backend, "accepts_pending", None)
        return bool(check is not None and check(self))

    def forward(self, query, key, value, positions, kv_cache: LayerKVCache, meta: AttentionMetadata):
        return self.backend.forward(self, query, key, value, positions, kv_cache, meta)
