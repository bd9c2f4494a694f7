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

from anybit.kernels.kv_cache_ops import (
    _check_cache_args,
    _write_one,
    kv_mode,
    kv_scale_args,
    ref_reshape_and_cache,
)
from anybit.kernels.pdl import pdl_enabled, pdl_launch


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
                  BLOCK_H: tl.constexpr, src_ptr=None, stride_st=0, stride_sh=0, SRC: tl.constexpr = False):
    """Rotate all heads of one token in place; cos/sin ``[BLOCK_HALF]`` float32. SRC: the heads are
    read from the float32 accumulator src_ptr instead (anybit/layers/pending.py; rounded to x's
    dtype first, then zeroed there) and the rotated values written to x_ptr."""
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
        if SRC:
            src = src_ptr + tok * stride_st + heads[:, None] * stride_sh
            x1 = tl.load(src + off1[None, :], mask=mask, other=0.0).to(x_ptr.dtype.element_ty)
            x2 = tl.load(src + off2[None, :], mask=mask, other=0.0).to(x_ptr.dtype.element_ty)
            zero = tl.zeros([BLOCK_H, BLOCK_HALF], tl.float32)
            tl.store(src + off1[None, :], zero, mask=mask)
            tl.store(src + off2[None, :], zero, mask=mask)
        else:
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


# ----------------------------------------------------------------------------------------------
# Fused: rotary on q/k + paged K/V cache write (one launch instead of two)
# ----------------------------------------------------------------------------------------------
def ref_rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache, slot_mapping: torch.Tensor):
    """``ref_rotary_embedding`` then ``ref_reshape_and_cache`` of the rotated key and the value.
    Returns the rotated ``(query, key)`` (new tensors); the cache is written in place."""
    q, k = ref_rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    ref_reshape_and_cache(k, value, kv_cache, slot_mapping)
    return q, k


@triton.jit
def _copy_heads(src_ptr, stride_st, stride_sh, x_ptr, stride_t, stride_h, tok, n_heads,
                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token's heads from a float32 accumulator to x_ptr (rounded to its dtype); zeroes them there."""
    offs = tl.arange(0, HEAD_DIM)
    heads = tl.arange(0, BLOCK_H)
    mask = heads[:, None] < n_heads
    src = src_ptr + tok * stride_st + heads[:, None] * stride_sh + offs[None, :]
    x = tl.load(src, mask=mask, other=0.0)
    tl.store(src, tl.zeros([BLOCK_H, HEAD_DIM], tl.float32), mask=mask)
    tl.store(x_ptr + tok * stride_t + heads[:, None] * stride_h + offs[None, :], x.to(x_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _rotary_cache_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cs_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, kz_ptr,
                         vz_ptr, slot_ptr, n_heads, n_kv_heads, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_cs, stride_cb, stride_ct, stride_ch, stride_sb,
                         stride_st, stride_sh, IS_NEOX: tl.constexpr, HALF: tl.constexpr,
                         BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, PAGE: tl.constexpr,
                         MODE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_KH: tl.constexpr,
                         PDL: tl.constexpr = False, aq_ptr=None, ak_ptr=None, av_ptr=None, stride_at=0,
                         stride_ah=0, ACC: tl.constexpr = False):
    """One program per token: rotate its query and key heads in place, then write the rotated key
    (read back after a block barrier, as the two-launch path would) and the value into the cache.
    PDL: positions, cos/sin and the slot (inputs of the step, not outputs of earlier kernels) are
    loaded before waiting for the previous kernel (anybit/kernels/pdl.py). ACC: q, k and v come
    from the QKV GEMV's float32 accumulator (views aq/ak/av, anybit/layers/pending.py; full rotary
    only): rounded to q's dtype, rotated into q_ptr / k_ptr, v copied to v_ptr, the accumulator
    zeroed."""
    if PDL:  # the trigger before any load (a trigger after loads broke RMSNorm's accumulator reads: pdl.py)
        tl.extra.cuda.gdc_launch_dependents()
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    cmask = offs_i < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + offs_i, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_i, mask=cmask, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if PDL:
        tl.extra.cuda.gdc_wait()
    _rotate_heads(q_ptr, stride_qt, stride_qh, tok, n_heads, cos, sin, IS_NEOX, HALF, BLOCK_HALF, BLOCK_H,
                  aq_ptr, stride_at, stride_ah, ACC)
    _rotate_heads(k_ptr, stride_kt, stride_kh, tok, n_kv_heads, cos, sin, IS_NEOX, HALF, BLOCK_HALF, BLOCK_H,
                  ak_ptr, stride_at, stride_ah, ACC)
    if ACC:
        _copy_heads(av_ptr, stride_at, stride_ah, v_ptr, stride_vt, stride_vh, tok, n_kv_heads, HEAD_DIM,
                    BLOCK_KH)
    tl.debug_barrier()  # the rotated key rows (and ACC: the value rows) were stored by other threads
    if slot >= 0:
        blk = slot // PAGE
        off = slot % PAGE
        dst_off = blk * stride_cb + off * stride_ct
        s_off = blk * stride_sb + off * stride_st
        _write_one(k_ptr, stride_kt, stride_kh, tok, kc_ptr, ks_ptr, kz_ptr, dst_off, s_off, stride_ch,
                   stride_sh, n_kv_heads, MODE, HEAD_DIM, BLOCK_KH)
        _write_one(v_ptr, stride_vt, stride_vh, tok, vc_ptr, vs_ptr, vz_ptr, dst_off, s_off, stride_ch,
                   stride_sh, n_kv_heads, MODE, HEAD_DIM, BLOCK_KH)


def rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool, kv_cache, slot_mapping: torch.Tensor,
                     acc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Triton ``rotary_embedding`` + ``reshape_and_cache`` in one launch, same results bit for bit.

    query ``[num_tokens, num_heads, head_dim]`` and key ``[num_tokens, num_kv_heads, head_dim]`` are
    rotated **in place** (returned); the rotated key and ``value`` are written (quantized for
    int8/int4) into ``kv_cache`` at ``slot_mapping`` (-1 = skip). Views with any token/head strides.
    ``acc``: float32 views ``(q, k, v)`` of a QKV GEMV's accumulator (anybit/layers/pending.py),
    same shapes and strides as each other's heads: the inputs are read from there (rounded to
    query's dtype) and the accumulator zeroed; query / key / value are then outputs only. Needs a
    full-width rotary (rotary_dim == head_dim).
    """
    _check_rope_args(positions, query, key, cos_sin_cache)
    _check_cache_args(key, value, kv_cache, slot_mapping)
    kc, vc = kv_cache.key, kv_cache.value
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_and_cache: query, key, value and cos_sin_cache must be contiguous in their "
                         "last dim")
    if kc.stride() != vc.stride() or kc.stride(-1) != 1:
        raise ValueError("rotary_and_cache: kv_cache.key and .value must share strides, last dim contiguous")
    head_dim = key.shape[2]
    if head_dim & (head_dim - 1):
        raise ValueError(f"rotary_and_cache: head_dim must be a power of two, got {head_dim}")
    mode = kv_mode(kv_cache.dtype)
    ks, vs, kz, vz, sstr = kv_scale_args(kv_cache)
    half = cos_sin_cache.shape[-1] // 2
    n_tok = query.shape[0]
    acc_kw = {}
    if acc is not None:
        aq, ak, av = acc
        if (2 * half != head_dim or any(a.dtype != torch.float32 for a in acc) or aq.shape != query.shape
                or ak.shape != key.shape or av.shape != value.shape
                or not aq.stride(1) == ak.stride(1) == av.stride(1)
                or (n_tok > 1 and not aq.stride(0) == ak.stride(0) == av.stride(0))
                or not aq.stride(2) == ak.stride(2) == av.stride(2) == 1):
            raise ValueError("rotary_and_cache: acc must be float32 (q, k, v) views shaped like query/key/"
                             "value with shared strides, and the rotary full-width")
        acc_kw = dict(aq_ptr=aq, ak_ptr=ak, av_ptr=av, stride_at=aq.stride(0), stride_ah=aq.stride(1),
                      ACC=True)
    if n_tok:
        _rotary_cache_kernel[(n_tok,)](
            positions, query, key, value, cos_sin_cache, kc, vc, ks, vs, kz, vz, slot_mapping,
            query.shape[1], key.shape[1], query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            value.stride(0), value.stride(1), cos_sin_cache.stride(0),
            kc.stride(0), kc.stride(1), kc.stride(2), sstr[0], sstr[1], sstr[2],
            IS_NEOX=is_neox, HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=8,
            PAGE=kv_cache.block_size, MODE=mode, HEAD_DIM=head_dim,
            BLOCK_KH=triton.next_power_of_2(key.shape[1]), PDL=pdl_enabled(query.device), num_warps=4,
            **acc_kw, **pdl_launch(query.device))
    return query, key
