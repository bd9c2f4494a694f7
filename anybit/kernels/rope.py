"""Rotary position embedding (RoFormer, Su et al. 2021) on query and key.

``cos_sin_cache [max_positions, rotary_dim]`` float32 holds cos in the first half and sin in the
second half of each row. Neox style rotates the two halves of the first ``rotary_dim`` channels
(HF ``rotate_half``); GPT-J style rotates interleaved pairs ``(2i, 2i+1)``. Channels past
``rotary_dim`` pass through unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _check_rope_args(positions, query, key, cos_sin_cache):
    if query.dim() != 3 or key.dim() != 3 or query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim] and key "
                         f"[num_tokens, num_kv_heads, head_dim], got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if positions.shape != (query.shape[0],):
        raise ValueError(f"positions must be [num_tokens={query.shape[0]}], got {tuple(positions.shape)}")
    rot = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot % 2 or rot > query.shape[2]:
        raise ValueError(f"cos_sin_cache must be [max_positions, rotary_dim] with even rotary_dim "
                         f"<= head_dim={query.shape[2]}, got {tuple(cos_sin_cache.shape)}")


def _ref_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x ``[num_tokens, heads, head_dim]``; cos/sin ``[num_tokens, 1, rotary_dim // 2]`` float32."""
    half = cos.shape[-1]
    rot = 2 * half
    xf = x.float()
    if is_neox:
        x1, x2 = xf[..., :half], xf[..., half:rot]
    else:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    out = xf.clone()
    if is_neox:
        out[..., :half], out[..., half:rot] = o1, o2
    else:
        out[..., 0:rot:2], out[..., 1:rot:2] = o1, o2
    return out.to(x.dtype)


def ref_rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """Rotate ``query [num_tokens, num_heads, head_dim]`` and ``key [num_tokens, num_kv_heads,
    head_dim]`` by ``positions [num_tokens]``. Returns new tensors ``(query, key)``, input dtypes."""
    _check_rope_args(positions, query, key, cos_sin_cache)
    cs = cos_sin_cache[positions.long()].float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _ref_rotate(query, cos, sin, is_neox), _ref_rotate(key, cos, sin, is_neox)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, tok, n_heads, cos, sin,
                  IS_NEOX: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """Rotate all heads of one token in place; cos/sin ``[BLOCK_HALF]`` float32."""
    offs_i = tl.arange(0, BLOCK_HALF)
    if IS_NEOX:
        off1 = offs_i
        off2 = offs_i + HALF
    else:
        off1 = 2 * offs_i
        off2 = 2 * offs_i + 1
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < n_heads) & (offs_i[None, :] < HALF)
        base = x_ptr + tok * stride_t + heads[:, None] * stride_h
        x1 = tl.load(base + off1[None, :], mask=mask, other=0.0)
        x2 = tl.load(base + off2[None, :], mask=mask, other=0.0)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        o1 = x1f * cos[None, :] - x2f * sin[None, :]
        o2 = x2f * cos[None, :] + x1f * sin[None, :]
        tl.store(base + off1[None, :], o1.to(x1.dtype), mask=mask)
        tl.store(base + off2[None, :], o2.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, n_heads, n_kv_heads,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   IS_NEOX: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    """One program per token: rotates its query heads and key heads in place."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    cmask = offs_i < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + offs_i, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_i, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, stride_qt, stride_qh, tok, n_heads, cos, sin, IS_NEOX, HALF, BLOCK_HALF, BLOCK_H)
    _rotate_heads(k_ptr, stride_kt, stride_kh, tok, n_kv_heads, cos, sin, IS_NEOX, HALF, BLOCK_HALF, BLOCK_H)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """Triton rotary embedding, **in place**: returns its inputs ``(query, key)``, rotated.

    positions ``[num_tokens]`` int; query ``[num_tokens, num_heads, head_dim]``; key
    ``[num_tokens, num_kv_heads, head_dim]`` (views with any token/head strides, last dim
    contiguous); cos_sin_cache ``[max_positions, rotary_dim]`` float32 (cos | sin).
    """
    _check_rope_args(positions, query, key, cos_sin_cache)
    if query.stride(-1) != 1 or key.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_embedding: query, key and cos_sin_cache must be contiguous in their "
                         "last dim")
    half = cos_sin_cache.shape[-1] // 2
    n_tok = query.shape[0]
    if n_tok:
        _rotary_kernel[(n_tok,)](positions, query, key, cos_sin_cache, query.shape[1], key.shape[1],
                                 query.stride(0), query.stride(1), key.stride(0), key.stride(1),
                                 cos_sin_cache.stride(0), IS_NEOX=is_neox, HALF=half,
                                 BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=8, num_warps=4)
    return query, key
