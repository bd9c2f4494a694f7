"""Varlen causal attention over a paged KV cache, for prompt chunks (FlashAttention-2 style).

The query tokens of sequence ``i`` are ``query[query_start_loc[i]:query_start_loc[i+1]]``; they are
the last ``query_len`` tokens of a context of ``seq_lens[i]`` tokens whose K/V (this step's
included) are already in the cache. Token ``j`` of the chunk sits at absolute position
``p = seq_len - query_len + j`` and sees keys at ``0..p`` (and only ``> p - sliding_window`` when a
window is set). GQA: query head ``h`` uses kv head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import torch

from anybit.kernels.kv_cache_ops import gather_kv
from anybit.layers.attention_meta import LayerKVCache


def _window(sliding_window) -> int:
    """0 means "no window"; None and negatives are normalized to 0."""
    return int(sliding_window) if sliding_window is not None and int(sliding_window) > 0 else 0


def ref_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               sliding_window) -> torch.Tensor:
    """Exact attention of one sequence's chunk against its whole context, float32 math.

    q ``[query_len, num_heads, head_dim]``; k, v ``[seq_len, num_kv_heads, head_dim]`` float32
    (the query tokens are the last ``query_len`` of the context). Returns float32
    ``[query_len, num_heads, head_dim]``.
    """
    qlen, nh, hd = q.shape
    slen, nkv, _ = k.shape
    if nh % nkv:
        raise ValueError(f"num_heads={nh} must be a multiple of num_kv_heads={nkv}")
    g = nh // nkv
    qf = q.float().reshape(qlen, nkv, g, hd).permute(1, 2, 0, 3)        # [nkv, g, qlen, hd]
    kf, vf = k.float().transpose(0, 1), v.float().transpose(0, 1)      # [nkv, slen, hd]
    s = torch.matmul(qf, kf.unsqueeze(1).transpose(-1, -2)) * scale     # [nkv, g, qlen, slen]
    qpos = torch.arange(slen - qlen, slen, device=q.device).unsqueeze(1)
    kpos = torch.arange(slen, device=q.device).unsqueeze(0)
    masked = kpos > qpos
    w = _window(sliding_window)
    if w:
        masked |= kpos <= qpos - w
    s = s.masked_fill(masked, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vf.unsqueeze(1))                                 # [nkv, g, qlen, hd]
    return o.permute(2, 0, 1, 3).reshape(qlen, nh, hd)


def _check_attn_args(query, kv_cache: LayerKVCache, block_table, name: str):
    if query.dim() != 3:
        raise ValueError(f"{name}: query must be [tokens, num_heads, head_dim], got {tuple(query.shape)}")
    nh, hd = query.shape[1], query.shape[2]
    if nh % kv_cache.num_kv_heads:
        raise ValueError(f"{name}: num_heads={nh} must be a multiple of kv_cache num_kv_heads="
                         f"{kv_cache.num_kv_heads}")
    want_hd = hd // 2 if kv_cache.dtype == "int4" else hd
    if kv_cache.key.shape[3] != want_hd:
        raise ValueError(f"{name}: kv_cache.key last dim must be {want_hd} for head_dim={hd} and "
                         f"{kv_cache.dtype}, got {kv_cache.key.shape[3]}")
    if block_table.dim() != 2:
        raise ValueError(f"{name}: block_table must be [num_seqs, max_blocks_per_seq], got "
                         f"{tuple(block_table.shape)}")


def ref_paged_attention_prefill(query: torch.Tensor, kv_cache: LayerKVCache, query_start_loc: torch.Tensor,
                                seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                                sliding_window, max_query_len: int, max_seq_len: int,
                                query_lens_cpu: list[int] | None = None,
                                seq_lens_cpu: list[int] | None = None) -> torch.Tensor:
    """query ``[num_tokens, num_heads, head_dim]`` -> out, same shape and dtype.

    query_start_loc ``[num_seqs + 1]`` int32, seq_lens ``[num_seqs]`` int32, block_table
    ``[num_seqs, max_blocks_per_seq]`` int32. The host lists avoid device syncs when given.
    """
    _check_attn_args(query, kv_cache, block_table, "paged_attention_prefill")
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    if query_lens_cpu is None:
        qsl = query_start_loc.tolist()
        query_lens_cpu = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
    out = torch.empty_like(query)
    start = 0
    for i, (qlen, slen) in enumerate(zip(query_lens_cpu, seq_lens_cpu)):
        if qlen == 0:
            continue
        k, v = gather_kv(kv_cache, block_table[i], slen)
        out[start:start + qlen] = ref_attend(query[start:start + qlen], k, v, scale,
                                             sliding_window).to(query.dtype)
        start += qlen
    return out
