"""Paged decode attention: one query token per sequence against its paged context.

Flash-Decoding (Dao et al. 2023): the context is split across programs (split-K), each computes
a partial softmax (max, sum, weighted V) and a reduction kernel merges them. GQA-aware: one
program handles all query heads of a kv head, so every KV block is read once per group.
``seq_lens[i]`` counts the context including this step's token, whose K/V is already cached; the
query sits at position ``seq_len - 1``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from anybit.kernels.attention_decode_gl import (
    GL_SPLIT_MIN,
    GL_STAGES,
    gl_decode_applies,
    gl_programs_per_sm,
    launch_decode_gl,
)
from anybit.kernels.attention_prefill import _check_attn_args, ref_attend
from anybit.kernels.kv_cache_ops import (
    _ASM_I8,
    _ASM_U4,
    _round_half_even,
    compute_dtype,
    gather_kv,
    kv_mode,
    kv_scale_args,
    load_codes_biased,
    load_kv_tile,
)
from anybit.kernels.pdl import pdl_enabled
from anybit.kernels.quant_gemm_h2 import _lock_buffer
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


# ----------------------------------------------------------------------------------------------
# Triton: split-K (flash-decoding) kernel + reduction
# ----------------------------------------------------------------------------------------------
# Exact (unbiased) code -> fp16 conversions for the V tiles: the biased value of kv_cache_ops'
# _ASM_I8 / _ASM_U4 minus the bias by one packed half2 subtraction per two codes (exact: |code| < 2^11).
# int8: ``code``; int4: centred, even channels ``code - 8``, odd channels ``16 * (code - 8)`` (the
# kernel adds ``8 * scale`` to the zero point): the PV accumulator then holds about the result
# instead of ``sum(p * scale * code)`` ~ 7.5 scales, which the zero-point sum would have to cancel.
_ASM_I8_EXACT: tl.constexpr = tl.constexpr("""{
.reg .b32 u, t0, t1, k;
xor.b32 u, $2, 0x80808080;
prmt.b32 t0, u, 0x64646464, 0x4140;
prmt.b32 t1, u, 0x64646464, 0x4342;
mov.b32 k, 0x64806480;
sub.f16x2 $0, t0, k;
sub.f16x2 $1, t1, k;
}""")

_ASM_U4_EXACT: tl.constexpr = tl.constexpr("""{
.reg .b32 t0, t1, u0, u1, u2, u3, k, k2;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 u0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 u1, t1, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 u2, t0, 0x00F000F0, 0x64006400, 0xEA;
lop3.b32 u3, t1, 0x00F000F0, 0x64006400, 0xEA;
mov.b32 k, 0x64086408;
mov.b32 k2, 0x64806480;
sub.f16x2 $0, u0, k;
sub.f16x2 $1, u1, k;
sub.f16x2 $2, u2, k2;
sub.f16x2 $3, u3, k2;
}""")


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _add3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _load_words(c_ptr, row, offs_w, valid):
    """Rows of cached codes as int32 words ``[BLOCK_N, words per row]`` (row offsets in bytes,
    multiples of 4: checked by the launcher); masked rows read as zero."""
    wp = (c_ptr + row[:, None]).to(tl.pointer_type(tl.int32)) + offs_w[None, :]
    return tl.load(wp, mask=valid[:, None], other=0)


@triton.jit
def _words_to_codes(w, MODE: tl.constexpr, HEAD_DIM: tl.constexpr, CDT: tl.constexpr, USE_ASM: tl.constexpr,
                    EXACT: tl.constexpr = False):
    """int32 code words ``[N, W]`` -> biased fp16 tiles, as kv_cache_ops ``load_codes_biased``:
    int8 ``a = 1152 + code`` ``[N, HEAD_DIM]`` (b = a); int4 ``a`` = even channels ``1024 + code``,
    ``b`` = odd channels ``1024 + 16 * code``, each ``[N, HEAD_DIM // 2]``. The words are split into
    bytes and interleaved back by joins along an in-thread axis; the packed PTX conversion then reads
    4 consecutive bytes = the original word (no data movement expected; checked in SASS). EXACT: the
    codes without the bias (``_bytes_to_codes``)."""
    N: tl.constexpr = w.shape[0]
    NB: tl.constexpr = HEAD_DIM if MODE == 1 else HEAD_DIM // 2
    BT: tl.constexpr = tl.int8 if MODE == 1 else tl.uint8
    b0 = w.to(BT)
    b1 = (w >> 8).to(BT)
    b2 = (w >> 16).to(BT)
    b3 = (w >> 24).to(BT)
    raw = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [N, NB])
    return _bytes_to_codes(raw, MODE, CDT, USE_ASM, EXACT)


@triton.jit
def _load_codes(c_ptr, row, MODE: tl.constexpr, HEAD_DIM: tl.constexpr, CDT: tl.constexpr,
                USE_ASM: tl.constexpr, EXACT: tl.constexpr):
    """kv_cache_ops ``load_codes_biased`` (unmasked gather of code rows), EXACT: without the bias."""
    if EXACT:
        offs = tl.arange(0, HEAD_DIM // 2 if MODE == 2 else HEAD_DIM)
        raw = tl.load(c_ptr + row[:, None] + offs[None, :])
        a, b = _bytes_to_codes(raw, MODE, CDT, USE_ASM, True)
    else:
        a, b = load_codes_biased(c_ptr, row, MODE, HEAD_DIM, CDT, USE_ASM)
    return a, b


@triton.jit
def _bytes_to_codes(raw, MODE: tl.constexpr, CDT: tl.constexpr, USE_ASM: tl.constexpr,
                    EXACT: tl.constexpr = False):
    """Raw code bytes -> fp16 tiles: biased (int8 ``1152 + code``; int4 ``1024 + code`` even channels,
    ``1024 + 16 * code`` odd) or EXACT (int8 ``code``; int4 ``code - 8`` / ``16 * (code - 8)``)."""
    if MODE == 2:
        if USE_ASM and EXACT:
            a, b = tl.inline_asm_elementwise(_ASM_U4_EXACT, "=r,=r,=r,=r,r", [raw],
                                             dtype=(tl.float16, tl.float16), is_pure=False, pack=4)
            a = a.to(CDT)
            b = b.to(CDT)
        elif EXACT:
            a = ((raw & 15).to(tl.float32) - 8.0).to(CDT)
            b = ((raw & 240).to(tl.float32) - 128.0).to(CDT)
        elif USE_ASM:
            a, b = tl.inline_asm_elementwise(_ASM_U4, "=r,=r,=r,=r,r", [raw], dtype=(tl.float16, tl.float16),
                                             is_pure=False, pack=4)
            a = a.to(CDT)
            b = b.to(CDT)
        else:
            a = (raw & 15).to(tl.float32).to(CDT) + 1024.0
            b = (raw & 240).to(tl.float32).to(CDT) + 1024.0
    else:
        if USE_ASM and EXACT:
            a = tl.inline_asm_elementwise(_ASM_I8_EXACT, "=r,=r,r", [raw], dtype=tl.float16, is_pure=False,
                                          pack=4).to(CDT)
        elif EXACT:
            a = raw.to(tl.float32).to(CDT)
        elif USE_ASM:
            a = tl.inline_asm_elementwise(_ASM_I8, "=r,=r,r", [raw], dtype=tl.float16, is_pure=False,
                                          pack=4).to(CDT)
        else:
            a = raw.to(tl.float32).to(CDT) + 1152.0
        b = a
    return a, b


@triton.jit
def _zeros_or_load(ptr, srow, valid, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int4 zero points of a tile (masked), zeros for other caches."""
    if MODE == 2:
        z = tl.load(ptr + srow, mask=valid, other=0.0).to(tl.float32)
    else:
        z = tl.zeros([BLOCK_N], tl.float32)
    return z


@triton.jit
def _pv_update(p, vsc, vz, va, vb, acc, acc_b, l, zsum, alpha, VB: tl.constexpr, MODE: tl.constexpr,
               CDT: tl.constexpr, V_EXACT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One KV tile's PV step of the biased quantized path (both loops of ``_decode_kernel``):
    probabilities p ``[BLOCK_G, BLOCK_N]`` times V codes va (vb: int4 odd channels) with per-token
    scales vsc / zero points vz ``[BLOCK_N]``; returns the rescaled (acc, acc_b, l, zsum). The row
    sums share one reduction (one cross-warp exchange instead of two or three). Without V_EXACT the
    tile's bias leaves the accumulator before its products enter (see ``_decode_kernel``); acc_b and
    zsum only matter for int4 (MODE 2)."""
    pw = (p * vsc[None, :]).to(CDT)
    if MODE == 2:
        if V_EXACT:  # centred int4 codes: zero point + 8 scales
            ps, zs = tl.reduce((p, p * (vz + 8.0 * vsc)[None, :]), 1, _add2)
            ws = ps
        else:
            ps, ws, zs = tl.reduce((p, pw.to(tl.float32), p * vz[None, :]), 1, _add3)
        zsum = zsum * alpha + zs
    else:
        if V_EXACT:
            ps = tl.sum(p, axis=1)
            ws = ps
        else:
            ps, ws = tl.reduce((p, pw.to(tl.float32)), 1, _add2)
    l = l * alpha + ps
    if V_EXACT:
        acc = tl.dot(pw, va, acc=acc * alpha[:, None], input_precision=DOT_PREC)
        if MODE == 2:
            acc_b = tl.dot(pw, vb, acc=acc_b * alpha[:, None], input_precision=DOT_PREC)
    else:
        acc = tl.dot(pw, va, acc=acc * alpha[:, None] - VB * ws[:, None], input_precision=DOT_PREC)
        if MODE == 2:
            acc_b = tl.dot(pw, vb, acc=acc_b * alpha[:, None] - VB * ws[:, None], input_precision=DOT_PREC)
    return acc, acc_b, l, zsum


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, bt_ptr, seq_lens_ptr,
                   out_ptr, mid_o_ptr, mid_lse_ptr, count_ptr, qk_scale, window, tokens_per_split,
                   stride_qs, stride_qh, stride_os, stride_oh,
                   stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, stride_bt,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                   PAGE: tl.constexpr, MODE: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
                   SPLIT_OUT: tl.constexpr, INT8_QK: tl.constexpr, INT8_PV: tl.constexpr,
                   BIASED: tl.constexpr, USE_ASM: tl.constexpr, HEADS_FIRST: tl.constexpr,
                   PREFETCH: tl.constexpr, V_EXACT: tl.constexpr, PDL: tl.constexpr = False,
                   MERGE_MAX: tl.constexpr = 0, G_P2: tl.constexpr = 1, TRIGGER: tl.constexpr = False,
                   DYN_SPLIT: tl.constexpr = False):
    """Grid (num_seqs, num_kv_heads, num_splits). One program = all G query heads of one kv head
    over one slice of the context; partial (o, lse) go to mid buffers when SPLIT_OUT (num_splits > 1;
    the split count itself is the grid size, not a compile-time constant: fewer compiled variants).
    HEADS_FIRST puts the kv head on grid axis 0 (launched fastest), so the programs of all kv heads
    of one token range are resident together: their rows of a page (and the 32-byte sectors of the
    per-token scales, 4 bytes per head) are read from DRAM at about the same time.

    BIASED (int8/int4 caches): K codes enter the QK^T MMA as biased fp16 values (kv_cache_ops
    ``load_codes_biased``), the bias leaves each score through ``kbias = bias * sum(q)`` (a short
    sum per score: its rounding does not grow with the context). V_EXACT: V codes enter the PV MMA
    without the bias (one packed half2 subtraction per two codes), so the PV accumulator only holds
    the result. Without V_EXACT the tile's bias ``bias * sum(p * v_scale)`` is taken out of the
    accumulator before the tile's products enter (cheaper, but that sum's float32 rounding lands on
    every channel of the row, amplified ~10^3). Never once per split at the end (session 2's code):
    tensor cores truncate each k-step's sum to the accumulator's precision, an accumulator carrying
    the bias of a whole split is ~10^3 times the result, and the error grew linearly with the tokens
    of a split (0.05-0.14 relative at 32k on the H100). int4 zero points enter as ``sum(q) * k_zero``
    per score and ``zsum = sum(p * v_zero)`` per row. PDL (anybit/kernels/pdl.py): the sequence
    length (a step input) is read before waiting for the kernel that wrote q and the cache.

    Splits past the context (``split >= cdiv(seq_len, tokens_per_split)``: a CUDA graph sizes the
    grid for max_model_len) return at once and write nothing. MERGE_MAX > 0 (SPLIT_OUT): the last
    split of a (sequence, kv head) to finish (``count_ptr`` counter, reset by it) merges the
    partials in split order, MERGE_MAX at a time, into out: no reduction kernel. TRIGGER: let the
    next kernel of the stream launch early (PDL; it waits for this grid before reading out).
    DYN_SPLIT: a sequence's slices are ``_split_len`` tokens (its own length spread over all splits,
    whole BLOCK_N blocks, at most ``tokens_per_split``) instead of ``tokens_per_split``: a short
    context uses as many one-block programs as it has blocks instead of a few multi-block ones."""
    if HEADS_FIRST:  # grid (num_kv_heads, num_seqs, splits): the kv heads of one token range run together
        kvh = tl.program_id(0)
        seq = tl.program_id(1).to(tl.int64)
        n_kv = tl.num_programs(0)
    else:
        seq = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        n_kv = tl.num_programs(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_splits = tl.num_programs(2)
    if DYN_SPLIT:
        tokens_per_split = _split_len(seq_len, tokens_per_split, num_splits, BLOCK_N)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    if split == num_splits - 1:
        end = seq_len  # a context longer than max_seq_len (stale CUDA graph sizing) stays correct
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    n_need = _splits_needed(seq_len, tokens_per_split, num_splits)
    if split >= n_need:
        return
    if window > 0:
        start = tl.maximum(start, seq_len - window)
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # int4: channels split into even (a) / odd (b) halves matching the low / high nibbles
    if MODE == 2:
        offs_a = 2 * tl.arange(0, HEAD_DIM // 2)
    else:
        offs_a = tl.arange(0, HEAD_DIM)
    offs_b = offs_a + 1
    q_rows = q_ptr + seq * stride_qs + heads[:, None] * stride_qh
    qa = tl.load(q_rows + offs_a[None, :], mask=gmask[:, None], other=0.0)
    qsum = tl.sum(qa.to(tl.float32), axis=1)
    if MODE == 2:
        acc = tl.zeros([BLOCK_G, HEAD_DIM // 2], tl.float32)
    else:
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    if MODE == 2:
        qb = tl.load(q_rows + offs_b[None, :], mask=gmask[:, None], other=0.0)
        qsum += tl.sum(qb.to(tl.float32), axis=1)
        if BIASED:  # odd channels come as 1024 + 16 * code: q / 16 (exact) gives 64 * sum(q) + q . code
            qb = (qb.to(tl.float32) * 0.0625).to(CDT)
        else:
            qb = qb.to(CDT)
        acc_b = tl.zeros([BLOCK_G, HEAD_DIM // 2], tl.float32)
    if INT8_QK:  # int8 cache: query quantized per head so raw K codes feed an int8 MMA
        qf = qa.to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(qf), axis=1), 1e-20) / 127.0
        qa = _round_half_even(qf / q_scale[:, None]).to(tl.int8)
    else:
        qa = qa.to(CDT)
    offs_raw = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    bt_row = bt_ptr + seq * stride_bt
    if BIASED:
        if MODE == 2:
            VB: tl.constexpr = 1024.0
            kbias = 1024.0 * (tl.sum(qa.to(tl.float32), axis=1) + tl.sum(qb.to(tl.float32), axis=1))
        else:
            VB: tl.constexpr = 1152.0
            kbias = 1152.0 * tl.sum(qa.to(tl.float32), axis=1)
        zsum = tl.zeros([BLOCK_G], tl.float32)
        if PREFETCH > 0:
            # Software pipelining in registers. Raw codes travel as int32 words (4 int8 / 8 int4 codes;
            # a loop-carried int8 tensor would take one register per byte) and are loaded one
            # half-iteration (PREFETCH 1: this tile's V at the top, the next tile's K after the
            # softmax) or one iteration (PREFETCH 2: the whole next tile) before their MMA. Triton's
            # own pipeliner gives the paged K/V loads one buffer (their rows come from the page table,
            # loaded in the same iteration), so without this each iteration waits the full DRAM
            # latency before its first MMA. Loads of rows past the context are masked (no extra bytes).
            WPR: tl.constexpr = HEAD_DIM // 4 if MODE == 1 else HEAD_DIM // 8  # words per row
            offs_w = tl.arange(0, WPR)
            ar = tl.arange(0, BLOCK_N)
            tok = start + ar
            valid = tok < end
            page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
            in_page = (tok % PAGE).to(tl.int64)
            row = page * stride_cb + in_page * stride_ct + kvh * stride_ch
            srow = page * stride_sb + in_page * stride_st + kvh * stride_sh
            kraw = _load_words(k_ptr, row, offs_w, valid)
            ksc = tl.load(ks_ptr + srow, mask=valid, other=0.0).to(tl.float32) * qk_scale
            kz = _zeros_or_load(kz_ptr, srow, valid, MODE, BLOCK_N) * qk_scale
            if PREFETCH == 2:
                vraw = _load_words(v_ptr, row, offs_w, valid)
                vsc = tl.load(vs_ptr + srow, mask=valid, other=0.0).to(tl.float32)
                vz = _zeros_or_load(vz_ptr, srow, valid, MODE, BLOCK_N)
            for n0 in range(start, end, BLOCK_N):
                if PREFETCH == 1:  # this tile's V: in flight during QK^T and the softmax
                    vraw = _load_words(v_ptr, row, offs_w, valid)
                    vsc = tl.load(vs_ptr + srow, mask=valid, other=0.0).to(tl.float32)
                    vz = _zeros_or_load(vz_ptr, srow, valid, MODE, BLOCK_N)
                tok_n = n0 + BLOCK_N + ar
                valid_n = tok_n < end
                page_n = tl.load(bt_row + tok_n // PAGE, mask=valid_n, other=0).to(tl.int64)
                in_page_n = (tok_n % PAGE).to(tl.int64)
                row_n = page_n * stride_cb + in_page_n * stride_ct + kvh * stride_ch
                srow_n = page_n * stride_sb + in_page_n * stride_st + kvh * stride_sh
                if PREFETCH == 2:  # the whole next tile: in flight during this iteration
                    kraw_n = _load_words(k_ptr, row_n, offs_w, valid_n)
                    ksc_n = tl.load(ks_ptr + srow_n, mask=valid_n, other=0.0).to(tl.float32) * qk_scale
                    kz_n = _zeros_or_load(kz_ptr, srow_n, valid_n, MODE, BLOCK_N) * qk_scale
                    vraw_n = _load_words(v_ptr, row_n, offs_w, valid_n)
                    vsc_n = tl.load(vs_ptr + srow_n, mask=valid_n, other=0.0).to(tl.float32)
                    vz_n = _zeros_or_load(vz_ptr, srow_n, valid_n, MODE, BLOCK_N)
                ka, kb = _words_to_codes(kraw, MODE, HEAD_DIM, CDT, USE_ASM)
                s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PREC)
                if MODE == 2:
                    s = tl.dot(qb, tl.trans(kb), acc=s, input_precision=DOT_PREC)
                    s = (s - kbias[:, None]) * ksc[None, :] + qsum[:, None] * kz[None, :]
                else:
                    s = (s - kbias[:, None]) * ksc[None, :]
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])
                if PREFETCH == 1:  # next K tile: in flight during PV and the next iteration's start
                    kraw = _load_words(k_ptr, row_n, offs_w, valid_n)
                    ksc = tl.load(ks_ptr + srow_n, mask=valid_n, other=0.0).to(tl.float32) * qk_scale
                    kz = _zeros_or_load(kz_ptr, srow_n, valid_n, MODE, BLOCK_N) * qk_scale
                va, vb = _words_to_codes(vraw, MODE, HEAD_DIM, CDT, USE_ASM, V_EXACT)
                if MODE == 2:
                    acc, acc_b, l, zsum = _pv_update(p, vsc, vz, va, vb, acc, acc_b, l, zsum, alpha, VB, MODE,
                                                     CDT, V_EXACT, DOT_PREC)
                else:
                    acc, _, l, zsum = _pv_update(p, vsc, vsc, va, va, acc, acc, l, zsum, alpha, VB, MODE,
                                                 CDT, V_EXACT, DOT_PREC)
                m = m_new
                row = row_n
                srow = srow_n
                valid = valid_n
                if PREFETCH == 2:
                    kraw = kraw_n
                    ksc = ksc_n
                    kz = kz_n
                    vraw = vraw_n
                    vsc = vsc_n
                    vz = vz_n
        else:
            for n0 in range(start, end, BLOCK_N):
                tok = n0 + tl.arange(0, BLOCK_N)
                valid = tok < end
                page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
                in_page = (tok % PAGE).to(tl.int64)
                row = page * stride_cb + in_page * stride_ct + kvh * stride_ch
                srow = page * stride_sb + in_page * stride_st + kvh * stride_sh
                ka, kb = load_codes_biased(k_ptr, row, MODE, HEAD_DIM, CDT, USE_ASM)
                # the softmax scale folded in
                ksc = tl.load(ks_ptr + srow, mask=valid, other=0.0).to(tl.float32) * qk_scale
                s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PREC)
                if MODE == 2:
                    s = tl.dot(qb, tl.trans(kb), acc=s, input_precision=DOT_PREC)
                    kz = tl.load(kz_ptr + srow, mask=valid, other=0.0).to(tl.float32) * qk_scale
                    s = (s - kbias[:, None]) * ksc[None, :] + qsum[:, None] * kz[None, :]
                else:
                    s = (s - kbias[:, None]) * ksc[None, :]
                s = tl.where(valid[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])
                va, vb = _load_codes(v_ptr, row, MODE, HEAD_DIM, CDT, USE_ASM, V_EXACT)
                vsc = tl.load(vs_ptr + srow, mask=valid, other=0.0).to(tl.float32)
                if MODE == 2:
                    vz = tl.load(vz_ptr + srow, mask=valid, other=0.0).to(tl.float32)
                    acc, acc_b, l, zsum = _pv_update(p, vsc, vz, va, vb, acc, acc_b, l, zsum, alpha, VB, MODE,
                                                     CDT, V_EXACT, DOT_PREC)
                else:
                    acc, _, l, zsum = _pv_update(p, vsc, vsc, va, va, acc, acc, l, zsum, alpha, VB, MODE,
                                                 CDT, V_EXACT, DOT_PREC)
                m = m_new
        if MODE == 2:
            acc = acc + zsum[:, None]
            acc_b = acc_b * 0.0625 + zsum[:, None]
    else:
        for n0 in range(start, end, BLOCK_N):
            tok = n0 + tl.arange(0, BLOCK_N)
            valid = tok < end
            page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
            in_page = (tok % PAGE).to(tl.int64)
            row = page * stride_cb + in_page * stride_ct + kvh * stride_ch
            srow = page * stride_sb + in_page * stride_st + kvh * stride_sh
            if INT8_QK:
                kraw = tl.load(k_ptr + row[:, None] + offs_raw[None, :], mask=valid[:, None], other=0)
                ksc = tl.load(ks_ptr + srow, mask=valid, other=0.0).to(tl.float32)
                s = tl.dot(qa, tl.trans(kraw)).to(tl.float32) * q_scale[:, None]
            else:
                ka, kb, ksc, kz = load_kv_tile(k_ptr, ks_ptr, kz_ptr, row, srow, valid, MODE, HEAD_DIM,
                                               BLOCK_N, CDT)
                s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PREC)
            if MODE == 2:
                s = tl.dot(qb, tl.trans(kb), acc=s, input_precision=DOT_PREC)
            if MODE > 0:
                s = s * ksc[None, :]
            if MODE == 2:
                s += qsum[:, None] * kz[None, :]
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if INT8_PV:  # p * v_scale quantized per row to int8 so raw V codes feed an int8 MMA
                vraw = tl.load(v_ptr + row[:, None] + offs_raw[None, :], mask=valid[:, None], other=0)
                vsc = tl.load(vs_ptr + srow, mask=valid, other=0.0).to(tl.float32)
                w = p * vsc[None, :]
                w_scale = tl.maximum(tl.max(w, axis=1), 1e-30) / 127.0
                w8 = tl.floor(w / w_scale[:, None] + 0.5).to(tl.int8)
                acc = acc * alpha[:, None] + tl.dot(w8, vraw).to(tl.float32) * w_scale[:, None]
            else:
                va, vb, vsc, vz = load_kv_tile(v_ptr, vs_ptr, vz_ptr, row, srow, valid, MODE, HEAD_DIM,
                                               BLOCK_N, CDT)
                if MODE == 0:
                    pw = p.to(CDT)
                else:
                    pw = (p * vsc[None, :]).to(CDT)
                acc = tl.dot(pw, va, acc=acc * alpha[:, None], input_precision=DOT_PREC)
            if MODE == 2:
                zc = tl.sum(p * vz[None, :], axis=1)[:, None]
                acc += zc
                acc_b = tl.dot(pw, vb, acc=acc_b * alpha[:, None], input_precision=DOT_PREC) + zc
            m = m_new
    l_safe = tl.where(l > 0.0, l, 1.0)
    if not SPLIT_OUT:
        o_rows = out_ptr + seq * stride_os + heads[:, None] * stride_oh
        tl.store(o_rows + offs_a[None, :], (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])
        if MODE == 2:
            tl.store(o_rows + offs_b[None, :], (acc_b / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                     mask=gmask[:, None])
    else:
        # mid_o [num_seqs, num_heads, num_splits, HEAD_DIM], mid_lse [num_seqs, num_heads, num_splits]
        n_heads = n_kv * G
        mrow = (seq * n_heads + heads) * num_splits + split
        mid_rows = mid_o_ptr + mrow[:, None] * HEAD_DIM
        tl.store(mid_rows + offs_a[None, :], acc / l_safe[:, None], mask=gmask[:, None])
        if MODE == 2:
            tl.store(mid_rows + offs_b[None, :], acc_b / l_safe[:, None], mask=gmask[:, None])
        tl.store(mid_lse_ptr + mrow, tl.where(l > 0.0, m + tl.log2(l_safe), float("-inf")), mask=gmask)
        if MERGE_MAX > 0:
            tl.debug_barrier()  # every thread's partial stores precede the release below
            counter = count_ptr + seq * n_kv + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel") == n_need - 1:  # the last split merges
                _merge_group(mid_o_ptr, mid_lse_ptr, out_ptr + seq * stride_os, stride_oh, kvh * G,
                             (seq * n_heads + kvh * G) * num_splits, num_splits, n_need, G, G_P2, HEAD_DIM,
                             MERGE_MAX)
                tl.atomic_xchg(counter, 0)  # counters stay zeroed between calls


@triton.jit
def _split_len(seq_len, tokens_per_split, num_splits, BLOCK_N: tl.constexpr):
    """DYN_SPLIT slice length: seq_len spread over num_splits in whole BLOCK_N blocks, between
    BLOCK_N and the graph-sized ``tokens_per_split``."""
    per = tl.cdiv(tl.cdiv(tl.maximum(seq_len, 1), num_splits), BLOCK_N) * BLOCK_N
    return tl.minimum(tokens_per_split, tl.maximum(per, BLOCK_N))


@triton.jit
def _splits_needed(seq_len, tokens_per_split, num_splits):
    """Splits that hold part of a context of seq_len tokens (the last split takes any overflow)."""
    return tl.minimum(tl.cdiv(tl.maximum(seq_len, 1), tokens_per_split), num_splits)


@triton.jit
def _merge_group(mid_o_ptr, mid_lse_ptr, out_seq_ptr, stride_oh, head0, base, num_splits, n_splits,
                 G: tl.constexpr, G_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr):
    """The G query heads head0.. of one kv group (G_P2 = next power of two): each head's n_splits
    partial softmaxes at rows base + g num_splits + split of mid_o ``[.., HEAD_DIM]`` / mid_lse
    (log2-sum-exp2, -inf for an empty split), BLOCK_K per round in split order with a running max
    (the same bits every call), to out rows head0 + g; all heads' loads of a round in flight
    together."""
    gs = tl.arange(0, G_P2)
    gmask = gs < G
    rows = base + gs * num_splits
    offs_d = tl.arange(0, HEAD_DIM)
    mx = tl.full([G_P2], float("-inf"), tl.float32)
    wsum = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, HEAD_DIM], tl.float32)
    for k0 in range(0, n_splits, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m2 = gmask[:, None] & (ks < n_splits)[None, :]
        idx = rows[:, None] + ks[None, :]
        lse = tl.load(mid_lse_ptr + idx, mask=m2, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(mid_o_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=m2[:, :, None],
                    other=0.0, cache_modifier=".cg")
        mx_new = tl.maximum(mx, tl.max(lse, axis=1))
        alpha = tl.where(mx_new > float("-inf"), tl.exp2(mx - mx_new), 1.0)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - mx_new[:, None]), 0.0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, axis=1)
        wsum = wsum * alpha + tl.sum(w, axis=1)
        mx = mx_new
    res = acc / tl.where(wsum > 0.0, wsum, 1.0)[:, None]
    tl.store(out_seq_ptr + (head0 + gs)[:, None] * stride_oh + offs_d[None, :],
             res.to(out_seq_ptr.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _decode_reduce_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, seq_lens_ptr, stride_os, stride_oh, num_splits,
                          tokens_per_split, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr = False, TRIGGER: tl.constexpr = False,
                          DYN_SPLIT: tl.constexpr = False, BLOCK_N: tl.constexpr = 64):
    """Grid (num_seqs, num_heads): merge the partial softmaxes of one query head (the splits that
    hold part of its context, <= num_splits <= BLOCK_K). Only with ``merge_max=0``."""
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    if DYN_SPLIT:
        tokens_per_split = _split_len(seq_len, tokens_per_split, num_splits, BLOCK_N)
    n_need = _splits_needed(seq_len, tokens_per_split, num_splits)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    _merge_group(mid_o_ptr, mid_lse_ptr, out_ptr + seq * stride_os, stride_oh, h,
                 (seq * tl.num_programs(1) + h) * num_splits, num_splits, n_need, 1, 1, HEAD_DIM, BLOCK_K)


# Register prefetch of the quantized tiles (``prefetch`` kwarg): off until measured on a GPU. With
# prefetch on and no ``max_registers`` given, the cap below applies (168: 3 programs per SM; int8
# prefetch 1 spills 20 bytes there, int4 none); ``max_registers=0`` means no cap (204-226 regs, 2/SM).
DEFAULT_PREFETCH = 0
# merge_max > 0: the decode kernel's last split merges the partials, this many at a time
# (_decode_kernel's MERGE_MAX), instead of a reduction kernel. Opt-in (env ANYBIT_DECODE_MERGE):
# on the H100 (call s7-4) it was no faster end to end (W4 batch 1: 384.6 vs 383.4 decode tok/s) and
# 4-10% slower for bf16 caches in the kernel benchmark; the counter's fence and atomic cost what
# the second launch did.
DECODE_MERGE_MAX = 0
# dyn_split default (env ANYBIT_DECODE_DYN_SPLIT overrides): see paged_attention_decode. H100 s9-1
# (W4 batch-1 decode graph, ~130-190 token contexts in splits sized for 8192): 2.395 -> 2.355 ms,
# the decode kernel 5.8 -> 4.5 us per layer (one 64-token block per program instead of two).
DECODE_DYN_SPLIT = True
DEFAULT_PREFETCH_MAX_REGISTERS = 168
# Quantized caches at batch >= PREFETCH_MIN_SEQS: prefetch 2 by default, with the register cap per mode
# (0 = none). H100 session 2 (benchmarks/results/attention_decode_variants.json): int4 pf2 (cap 168)
# 1.14-1.27x over no prefetch at batch 32/64; int8 pf2 without cap (~216 regs, 2 programs/SM)
# 1.04-1.09x. Its output "drift" there was the split count meeting the bias bug fixed in session 3
# (V bias accumulated over a whole split), not the prefetch. Slower at batch 1: off there.
# Session 10 (H100 s10-2, attention_decode_small_s10.json, b32/b64 at 16k): smaller programs with more of
# them per SM, each keeping prefetch 2 without a cap: int8 2 warps x 64 tokens 1.73x bf16 (the session-3
# default 1.56-1.59x), int4 1 warp x 32 tokens 2.17x (1.97-1.99x). (prefetch, maxnreg, block_n, num_warps).
PREFETCH_MIN_SEQS = 16
DEFAULT_PREFETCH_BY_MODE = {1: (2, 0, 64, 2), 2: (2, 0, 32, 1)}
INT4_PREFETCH_MIN_SEQS = PREFETCH_MIN_SEQS  # old name

# The one-warp Gluon kernel (attention_decode_gl) is the default from GL_MIN_SEQS sequences for int4
# and int8 caches. H100 s14-4/5 in CUDA graphs (graph-sized splits, the engine's cache layouts:
# head-major codes, packed scales): int4 at batch 8-64 from 4k tokens 1.2-1.6x the Triton kernel; int8
# at batch 8 1.16-1.24x. Int8 at batch 32/64 stayed on the Triton kernel until session 15: with the
# splits of GL_WAVE_FILL (H100 s15-3/4, attention_decode_splits_*_s15_*) the Gluon kernel is 1.5-5%
# faster from 4k tokens and 1-2% slower at 1k. At batch 1 it is 2-4 us slower per call below 16k
# tokens (a longer latency chain per program; s13).
GL_MIN_SEQS = 8
# The Gluon kernel lets its split merge start early (programmatic dependent launch: the merge's
# launch overlaps the decode grid, then waits for it; env ANYBIT_GL_REDUCE_PDL=0 turns it off). H100
# s15-2 (attention_decode_splits_s15_2): 0.5-1 us less per call at b32/b64 x 4k-16k.
GL_REDUCE_PDL = os.environ.get("ANYBIT_GL_REDUCE_PDL", "1") == "1"
# The Gluon kernel merges its own splits (the last split of each (sequence, kv head) to finish, through a
# counter) instead of a merge kernel, up to GL_MERGE_MAX_SPLITS splits; env ANYBIT_GL_MERGE=0/1 overrides
# both. H100 s19-2 (attention_decode_splits_merge_s19_2, CUDA graphs): b32 x 16 tokens 10.6 -> 7.8 us
# per call, b32 x 4k int4 63.0 -> 60.9 us (int8 102.0 -> 98.9), b16/b64 0.5-1% faster; at b8 (13 splits,
# the in-kernel merge reads them 4 at a time) int8 31.7 -> 32.5 us, so from 9 splits the merge kernel stays.
GL_MERGE = True
GL_MERGE_MAX_SPLITS = 8


def gl_merge(splits: int) -> bool:
    """Whether the Gluon decode merges its ``splits`` in-kernel (``GL_MERGE`` up to ``GL_MERGE_MAX_SPLITS``,
    env ``ANYBIT_GL_MERGE`` = 0/1 overrides); never for one split."""
    env = os.environ.get("ANYBIT_GL_MERGE")
    if splits < 2:
        return False
    return env == "1" if env in ("0", "1") else GL_MERGE and splits <= GL_MERGE_MAX_SPLITS


# Fraction of the Gluon kernel's resident program slots that its splits aim to fill (choose_splits'
# capacity). H100 s15-2, int4 b32 x 4k: 4 splits (1024 programs, half the slots) 66.1 us against 69.3
# at 8 (2048); b32 x 16k 222.6 against 226.8; b64 (already 4 splits) unchanged: a program's fixed
# cost (page-id chain, partial store) outweighs the extra occupancy.
GL_WAVE_FILL = float(os.environ.get("ANYBIT_GL_WAVE_FILL", "0.5"))
# The Gluon kernel itself as a PDL launch (older chunks requested before griddepcontrol.wait) was 1.25-1.6x
# slower at b8/b64 (H100 s15-13, attention_decode_splits_pdl_s15_13) and was removed.

_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


# Registers per thread of the small quantized programs with prefetch 2 (offline sm_90 compile, d128,
# G = 4, no cap): (mode, num_warps, block_n) -> regs. 1 warp x 16: 223 / 233; 2 x 32: 207 / 184;
# 1 x 32: 255 / 254; 2 x 64: 255 / 243; 4 x 64: 168 / 182 (int8 / int4).
SMALL_PROGRAM_REGS = {(1, 1, 16): 223, (2, 1, 16): 233, (1, 2, 32): 207, (2, 2, 32): 184,
                      (1, 1, 32): 255, (2, 1, 32): 254, (1, 2, 64): 255, (2, 2, 64): 243,
                      (1, 4, 64): 168, (2, 4, 64): 182}


def blocks_per_sm(mode: int, block_n: int, num_warps: int, num_stages: int, max_registers: int | None,
                  prefetch: int = 0) -> int:
    """Resident programs per SM on Hopper (registers and shared memory from ptxas for d128,
    G=4: bf16 (64, 4, 3) 128 regs / 39 KB -> 4; quantized (128, 4, 3) 154-168 regs / 59-75 KB -> 3;
    quantized (128, 4, 1) capped at 128 regs / 41 KB -> 4; register prefetch (128, 4, 1) 204-226
    regs -> 2, capped at 168 -> 3). Only sizes the split count."""
    key = (mode, num_warps, block_n)
    if mode > 0 and (num_warps < 4 or (prefetch and max_registers is None and key in SMALL_PROGRAM_REGS)):
        regs = (SMALL_PROGRAM_REGS.get(key, 255) + 7) // 8 * 8  # quantized, 255 when not listed
        return max(1, 65536 // (regs * 32 * num_warps))
    if num_warps != 4:
        return 2
    if mode == 0:
        return 4 if block_n <= 64 else 3
    if max_registers is not None and max_registers <= 128 and (num_stages == 1 or block_n <= 64):
        return 4
    if prefetch:
        return 3 if max_registers is not None and max_registers <= 168 else 2
    return 3 if block_n <= 128 else 1


def choose_splits(pairs: int, max_seq_len: int, capacity: int) -> int:
    """Splits per (sequence, kv head) from host ints: at least 128 tokens per split; if all
    programs fit in one wave use as many as allowed, else the fewest splits whose last wave is
    >= 90% full (programs / capacity close to a whole number of waves), else the fullest."""
    pairs = max(pairs, 1)
    max_s = max(1, min(triton.cdiv(max(max_seq_len, 1), 128), 128))
    if pairs * max_s <= capacity:
        return max_s
    best, best_eff = 1, 0.0
    for s in range(1, max_s + 1):
        waves = pairs * s / capacity
        eff = waves / math.ceil(waves)
        if eff >= 0.9:
            return s
        if eff > best_eff:
            best, best_eff = s, eff
    return best


def decode_config(num_seqs: int, num_kv_heads: int, max_seq_len: int, mode: int, device: torch.device):
    """Host-side choice of (block_n, num_splits, num_warps, num_stages) from shapes only."""
    block_n = 64 if mode == 0 else 128
    cap = blocks_per_sm(mode, block_n, 4, 3, None) * _num_sms(device)
    return block_n, choose_splits(num_seqs * num_kv_heads, max_seq_len, cap), 4, 3


def paged_attention_decode(query: torch.Tensor, kv_cache: LayerKVCache, seq_lens: torch.Tensor,
                           block_table: torch.Tensor, scale: float, sliding_window, max_seq_len: int,
                           seq_lens_cpu: list[int] | None = None, *, num_splits: int | None = None,
                           block_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None,
                           out: torch.Tensor | None = None, int8_qk: bool = False,
                           int8_pv: bool = False, biased: bool | None = None,
                           heads_first: bool | None = None, max_registers: int | None = None,
                           prefetch: int | None = None, exact_v: bool = True,
                           pdl: bool | None = None, merge_max: int | None = None,
                           dyn_split: bool | None = None, gl: bool | None = None) -> torch.Tensor:
    """Triton split-K paged decode (Flash-Decoding). No host syncs (CUDA-graph friendly).

    query ``[num_seqs, num_heads, head_dim]`` -> out same shape/dtype; seq_lens ``[num_seqs]``
    int32 (context incl. the current token); block_table ``[num_seqs, max_blocks_per_seq]`` int32.
    int8 caches only: ``int8_qk`` quantizes the query per head to int8 and runs QK^T on int8 tensor
    cores; ``int8_pv`` quantizes ``p * v_scale`` per row to int8 for an int8 PV product (both
    approximations beyond the cache's own quantization; off by default).
    ``biased`` (int8/int4 caches): codes enter the MMAs as biased fp16 values converted by packed
    integer instructions, bias and scales folded into scores / probabilities (default: on for
    bf16/fp16 queries on the GPU; float32 queries keep the exact per-element path: the bias
    cancellation costs ~1e-5 relative error in float32, far below bf16 rounding).
    ``heads_first``: grid order (num_kv_heads, num_seqs, splits) instead of (num_seqs, num_kv_heads,
    splits), meant for DRAM locality of the short per-head rows of quantized caches; measured no
    faster on an H200, so off by default.
    ``max_registers``: register cap per thread (Triton ``maxnreg``), for occupancy experiments
    (0 = no cap; with ``prefetch`` on, None means ``DEFAULT_PREFETCH_MAX_REGISTERS``).
    ``exact_v`` (biased path): V codes enter the PV product without the bias (exact accumulation; default);
    False takes each tile's bias out of the accumulator instead (fewer instructions, ~1e-4 relative
    common-mode rounding per row, see ``_decode_kernel``).
    ``prefetch`` (biased quantized path only): 0 off; 1 the next K tile and the current V tile are
    loaded into registers one half-iteration ahead; 2 the whole next K/V tile one iteration ahead
    (more registers). Exact same math; default ``DEFAULT_PREFETCH``. Prefetching variants default to
    ``num_stages=1`` (the loop-carried loads are plain loads; Triton's pipeliner stays out).
    The context is cut into ``num_splits`` slices of ``tokens_per_split`` (from ``max_seq_len``),
    each program reads its slice once for all heads of a GQA group; a reduction kernel merges.
    ``pdl``: programmatic dependent launch of both kernels (None: off unless ``ANYBIT_PDL_ATTN=1``;
    it made the W4 batch-1 decode graph slower on the H100: launched early, the kernels hold SM
    slots while they wait). Whatever ``pdl`` says, on PDL-capable GPUs both kernels let the next
    kernel of the stream launch early (the output projection prefetches its weights meanwhile).
    ``merge_max``: the splits are merged by the decode kernel's last split of each (sequence, kv
    head), this many partials at a time (no reduction kernel); 0 = the reduction kernel instead.
    Default: env ``ANYBIT_DECODE_MERGE``, else ``DECODE_MERGE_MAX`` (0).
    ``gl``: int8 / int4 caches on Hopper run attention_decode_gl's one-warp Gluon kernel where it
    applies (``gl_decode_applies``, off with env ``ANYBIT_DECODE_GL=0``) and no Triton-kernel tuning
    argument is given; None: from ``GL_MIN_SEQS`` sequences;
    False: always this module's Triton kernel.
    ``dyn_split``: each sequence spreads its own length over the splits (whole blocks of
    ``block_n``, at most the ``max_seq_len``-sized slice), so a short context in a graph sized for
    long ones runs one block per program; default env ``ANYBIT_DECODE_DYN_SPLIT``, else
    ``DECODE_DYN_SPLIT``.
    """
    _check_attn_args(query, kv_cache, block_table, "paged_attention_decode")
    mode = kv_mode(kv_cache.dtype)
    num_seqs, num_heads, head_dim = query.shape
    nkv = kv_cache.num_kv_heads
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"paged_attention_decode: head_dim must be a power of two >= 16, got {head_dim}")
    if query.stride(-1) != 1 or kv_cache.key.stride() != kv_cache.value.stride():
        raise ValueError("paged_attention_decode: query last dim must be contiguous and key/value caches "
                         "must share strides")
    if seq_lens.shape != (num_seqs,) or block_table.shape[0] < num_seqs:
        raise ValueError(f"paged_attention_decode: seq_lens must be [num_seqs={num_seqs}] and block_table "
                         f"have >= num_seqs rows, got {tuple(seq_lens.shape)} and {tuple(block_table.shape)}")
    cdt, prec = compute_dtype(query, kv_cache)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if biased is None:  # float32 queries keep exact parity with the torch backend (greedy tests)
        biased = cdt == tl.float16
    biased = bool(biased and mode > 0 and not int8_qk and not int8_pv)
    tuned = (block_n, num_warps, num_stages, max_registers, prefetch, merge_max) != (None,) * 6
    if gl is None:  # H100 s14-4/5, s15-3/4 (CUDA graphs): see GL_MIN_SEQS
        gl = num_seqs >= GL_MIN_SEQS
    use_gl = (gl and not tuned and biased and not interpret and exact_v
              and gl_decode_applies(query, kv_cache))
    if use_gl:
        return _paged_decode_gl(query, kv_cache, seq_lens, block_table, scale, sliding_window, max_seq_len,
                                num_splits, out, dyn_split)
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH
        if mode in DEFAULT_PREFETCH_BY_MODE and num_seqs >= PREFETCH_MIN_SEQS and biased:
            prefetch, cap, bn, warps = DEFAULT_PREFETCH_BY_MODE[mode]
            if max_registers is None:
                max_registers = cap
            if block_n is None and num_warps is None:
                block_n, num_warps = bn, warps
    prefetch = int(prefetch) if biased else 0
    if prefetch not in (0, 1, 2):
        raise ValueError(f"paged_attention_decode: prefetch must be 0, 1 or 2, got {prefetch}")
    if prefetch and (kv_cache.key.stride(0) % 4 or kv_cache.key.stride(1) % 4 or kv_cache.key.stride(2) % 4
                     or kv_cache.key.data_ptr() % 4 or kv_cache.value.data_ptr() % 4):
        prefetch = 0  # the prefetch path reads the codes as int32 words
    if prefetch and num_stages is None:
        num_stages = 1
    if prefetch and max_registers is None:
        max_registers = DEFAULT_PREFETCH_MAX_REGISTERS
    max_registers = max_registers or None  # 0: no cap
    ks, vs, kz, vz, sstr = kv_scale_args(kv_cache)
    d_bn, d_splits, d_warps, d_stages = decode_config(num_seqs, nkv, max_seq_len, mode, query.device)
    if num_splits is None and ((block_n, num_warps, num_stages, max_registers) != (None,) * 4 or prefetch):
        cap = blocks_per_sm(mode, block_n or d_bn, num_warps or d_warps, num_stages or d_stages,
                            max_registers, prefetch) * _num_sms(query.device)
        d_splits = choose_splits(num_seqs * nkv, max_seq_len, cap)
    block_n = block_n or d_bn
    splits, tps = _split_slices(max_seq_len, num_splits or d_splits, block_n)
    g = num_heads // nkv
    out = _checked_out(query, out)
    if num_seqs == 0:
        return out
    if merge_max is None:
        merge_max = int(os.environ.get("ANYBIT_DECODE_MERGE", DECODE_MERGE_MAX))
    merge_max = int(merge_max)
    if merge_max < 0 or merge_max & (merge_max - 1):
        raise ValueError(f"paged_attention_decode: merge_max must be 0 or a power of two, got {merge_max}")
    dyn_split = _dyn_split(dyn_split, splits)
    mid_o, mid_lse = _split_partials(query, splits, out)
    counts = _lock_buffer(query.device, num_seqs * nkv, "decode") if merge_max and splits > 1 else mid_lse
    kc = kv_cache.key
    window = int(sliding_window) if sliding_window is not None and int(sliding_window) > 0 else 0
    if heads_first is None:  # measured: no gain (run 5), seq-first 2-4% faster at 16k-32k for int8
        heads_first = False
    grid = (nkv, num_seqs, splits) if heads_first else (num_seqs, nkv, splits)
    if pdl is None:  # measured (session 3, call 7, H100 W4 batch 1): decode graph 2.72 ms without, 2.79 with
        pdl = os.environ.get("ANYBIT_PDL_ATTN", "0") == "1"
    pdl = pdl_enabled(query.device, pdl)
    trigger = pdl_enabled(query.device, True)
    launch = {"launch_pdl": True} if pdl else {}
    _decode_kernel[grid](
        query, kc, kv_cache.value, ks, vs, kz, vz, block_table, seq_lens, out, mid_o, mid_lse, counts,
        scale * 1.4426950408889634, window, tps,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), sstr[0], sstr[1], sstr[2], block_table.stride(0),
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), HEAD_DIM=head_dim, BLOCK_N=block_n,
        PAGE=kv_cache.block_size, MODE=mode, CDT=cdt, DOT_PREC=prec, SPLIT_OUT=splits > 1,
        INT8_QK=bool(int8_qk and mode == 1), INT8_PV=bool(int8_pv and mode == 1),
        BIASED=biased, USE_ASM=bool(biased and cdt == tl.float16 and not interpret),
        HEADS_FIRST=bool(heads_first), PREFETCH=prefetch, V_EXACT=bool(exact_v), PDL=pdl,
        MERGE_MAX=merge_max if splits > 1 else 0, G_P2=triton.next_power_of_2(g), TRIGGER=trigger,
        DYN_SPLIT=dyn_split, num_warps=num_warps or d_warps, num_stages=num_stages or d_stages,
        **({"maxnreg": max_registers} if max_registers else {}), **launch)
    if splits > 1 and not merge_max:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            mid_o, mid_lse, out, seq_lens, out.stride(0), out.stride(1), splits, tps, HEAD_DIM=head_dim,
            BLOCK_K=triton.next_power_of_2(splits), PDL=pdl, TRIGGER=trigger, DYN_SPLIT=dyn_split,
            BLOCK_N=block_n, num_warps=4, **launch)
    return out


def _paged_decode_gl(query, kv_cache, seq_lens, block_table, scale, sliding_window, max_seq_len, num_splits,
                     out, dyn_split):
    """paged_attention_decode through attention_decode_gl's kernel: splits sized from its resident
    programs per SM (``gl_programs_per_sm``), slices in multiples of ``GL_SPLIT_MIN`` tokens, merged by
    ``_decode_reduce_kernel``."""
    num_seqs, num_heads, head_dim = query.shape
    nkv = kv_cache.num_kv_heads
    mode = kv_mode(kv_cache.dtype)
    out = _checked_out(query, out)
    if num_seqs == 0:
        return out
    # GL_WAVE_FILL was tuned (s15) on the single-chunk ring (16 resident programs per SM); the split count
    # keeps that target with pairs too (s18-1 measured them at it), though int8's 4-slot pair ring fits 12
    sms = _num_sms(query.device)
    slots = gl_programs_per_sm(mode, head_dim, GL_STAGES[mode])
    cap = max(1, int(slots * GL_WAVE_FILL)) * sms
    splits, tps = _split_slices(max_seq_len, num_splits or choose_splits(num_seqs * nkv, max_seq_len, cap),
                                GL_SPLIT_MIN)
    dyn_split = _dyn_split(dyn_split, splits)
    mid_o, mid_lse = _split_partials(query, splits, out)
    window = int(sliding_window) if sliding_window is not None and int(sliding_window) > 0 else 0
    trigger = pdl_enabled(query.device, True)
    merge = gl_merge(splits)
    pdl = splits > 1 and trigger and GL_REDUCE_PDL and not merge
    counters = _lock_buffer(query.device, num_seqs * nkv, "decode_gl") if merge else None
    launch_decode_gl(query, kv_cache, seq_lens, block_table, out, mid_o, mid_lse, scale * 1.4426950408889634,
                     window, tps, splits, dyn_split, trigger=pdl, sms=sms, counters=counters)
    if splits > 1 and not merge:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            mid_o, mid_lse, out, seq_lens, out.stride(0), out.stride(1), splits, tps, HEAD_DIM=head_dim,
            BLOCK_K=triton.next_power_of_2(splits), PDL=pdl, TRIGGER=trigger, DYN_SPLIT=dyn_split,
            BLOCK_N=GL_SPLIT_MIN, num_warps=4, **({"launch_pdl": True} if pdl else {}))
    return out


def _split_slices(max_seq_len: int, splits: int, granule: int) -> tuple[int, int]:
    """``(splits, tokens_per_split)``: slices of whole multiples of ``granule`` tokens covering
    ``max_seq_len``, at most ``splits`` of them."""
    length = max(max_seq_len, 1)
    tps = triton.cdiv(triton.cdiv(length, splits), granule) * granule
    return max(1, triton.cdiv(length, tps)), tps


def _dyn_split(dyn_split: bool | None, splits: int) -> bool:
    """Per-sequence split lengths (default env ``ANYBIT_DECODE_DYN_SPLIT``, else ``DECODE_DYN_SPLIT``);
    meaningless with one split."""
    if dyn_split is None:
        dyn_split = os.environ.get("ANYBIT_DECODE_DYN_SPLIT", str(int(DECODE_DYN_SPLIT))) == "1"
    return bool(dyn_split and splits > 1)


def _split_partials(query: torch.Tensor, splits: int, out: torch.Tensor):
    """``(mid_o [num_seqs, num_heads, splits, head_dim], mid_lse [num_seqs, num_heads, splits])``
    float32 partials of a split decode; with one split the kernel writes ``out`` directly (both
    returned as ``out``)."""
    if splits == 1:
        return out, out
    num_seqs, num_heads, head_dim = query.shape
    mid_o = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    return mid_o, torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=query.device)


def _checked_out(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The output buffer: ``out`` after checking it matches query (shape, dtype, last dim contiguous),
    or a new one."""
    if out is None:
        return torch.empty_like(query)
    if out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must match query {tuple(query.shape)} {query.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    return out
