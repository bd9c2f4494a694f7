"""Varlen causal attention over a paged KV cache, for prompt chunks (FlashAttention-2 style).

The query tokens of sequence ``i`` are ``query[query_start_loc[i]:query_start_loc[i+1]]``; they are
the last ``query_len`` tokens of a context of ``seq_lens[i]`` tokens whose K/V (this step's
included) are already in the cache. Token ``j`` of the chunk sits at absolute position
``p = seq_len - query_len + j`` and sees keys at ``0..p`` (and only ``> p - sliding_window`` when a
window is set). GQA: query head ``h`` uses kv head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anybit.kernels.kv_cache_ops import compute_dtype, gather_kv, kv_mode, kv_scale_args, load_kv_tile
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


# ----------------------------------------------------------------------------------------------
# Triton: varlen causal flash attention over the paged cache
# ----------------------------------------------------------------------------------------------
@triton.jit
def _prefill_inner(acc, acc_b, l, m, qa, qb, qsum, qpos, k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr,
                   bt_row, kvh, lo, hi, qk_scale, window,
                   stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, MODE: tl.constexpr,
                   CDT: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Online softmax over key tiles ``[lo, hi)``; MASKED applies causal (and window) masks.
    int4 (MODE 2) carries even channels in ``acc`` and odd channels in ``acc_b``."""
    for n0 in range(lo, hi, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        valid = tok < hi
        page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
        in_page = (tok % PAGE).to(tl.int64)
        row = page * stride_cb + in_page * stride_ct + kvh * stride_ch
        srow = page * stride_sb + in_page * stride_st + kvh * stride_sh
        ka, kb, ksc, kz = load_kv_tile(k_ptr, ks_ptr, kz_ptr, row, srow, valid, MODE, HEAD_DIM, BLOCK_N, CDT)
        s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PREC)
        if MODE == 2:
            s = tl.dot(qb, tl.trans(kb), acc=s, input_precision=DOT_PREC)
        if MODE > 0:
            s = s * ksc[None, :]
        if MODE == 2:
            s += qsum[:, None] * kz[None, :]
        s = s * qk_scale
        if MASKED:
            keep = (tok[None, :] <= qpos[:, None]) & valid[None, :]
            if HAS_WINDOW:
                keep = keep & (tok[None, :] > qpos[:, None] - window)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        va, vb, vsc, vz = load_kv_tile(v_ptr, vs_ptr, vz_ptr, row, srow, valid, MODE, HEAD_DIM, BLOCK_N, CDT)
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
    return acc, acc_b, l, m


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, bt_ptr, qsl_ptr, seq_lens_ptr,
                    out_ptr, qk_scale, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, stride_bt,
                    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    PAGE: tl.constexpr, MODE: tl.constexpr, CDT: tl.constexpr, DOT_PREC: tl.constexpr,
                    HAS_WINDOW: tl.constexpr):
    """Grid (cdiv(max_query_len, BLOCK_M), num_heads, num_seqs); heaviest (last) query tiles first."""
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if mb * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx0 = seq_len - q_len
        kvh = h // G
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < q_len
        qpos = ctx0 + offs_m
        if MODE == 2:
            offs_a = 2 * tl.arange(0, HEAD_DIM // 2)
        else:
            offs_a = tl.arange(0, HEAD_DIM)
        offs_b = offs_a + 1
        q_rows = (q_start + offs_m).to(tl.int64)
        q_base = q_ptr + q_rows[:, None] * stride_qt + h * stride_qh
        qa = tl.load(q_base + offs_a[None, :], mask=m_valid[:, None], other=0.0)
        qsum = tl.sum(qa.to(tl.float32), axis=1)
        if MODE == 2:
            qb = tl.load(q_base + offs_b[None, :], mask=m_valid[:, None], other=0.0)
            qsum += tl.sum(qb.to(tl.float32), axis=1)
            qb = qb.to(CDT)
            acc = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        qa = qa.to(CDT)
        if MODE != 2:
            qb = qa
        acc_b = acc
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        first_q = ctx0 + mb * BLOCK_M
        hi = tl.minimum(seq_len, first_q + BLOCK_M)
        bt_row = bt_ptr + seq * stride_bt
        if HAS_WINDOW:
            lo = tl.maximum(first_q - window + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
            full_end = lo
        else:
            lo = 0
            full_end = ((first_q + 1) // BLOCK_N) * BLOCK_N
        acc, acc_b, l, m = _prefill_inner(acc, acc_b, l, m, qa, qb, qsum, qpos, k_ptr, v_ptr, ks_ptr, vs_ptr,
                                          kz_ptr, vz_ptr, bt_row, kvh, lo, full_end, qk_scale, window,
                                          stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                                          HEAD_DIM, BLOCK_N, PAGE, MODE, CDT, DOT_PREC, False, HAS_WINDOW)
        acc, acc_b, l, m = _prefill_inner(acc, acc_b, l, m, qa, qb, qsum, qpos, k_ptr, v_ptr, ks_ptr, vs_ptr,
                                          kz_ptr, vz_ptr, bt_row, kvh, full_end, hi, qk_scale, window,
                                          stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh,
                                          HEAD_DIM, BLOCK_N, PAGE, MODE, CDT, DOT_PREC, True, HAS_WINDOW)
        l_safe = tl.where(l > 0.0, l, 1.0)
        o_base = out_ptr + q_rows[:, None] * stride_ot + h * stride_oh
        tl.store(o_base + offs_a[None, :], (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                 mask=m_valid[:, None])
        if MODE == 2:
            tl.store(o_base + offs_b[None, :], (acc_b / l_safe[:, None]).to(out_ptr.dtype.element_ty),
                     mask=m_valid[:, None])


def prefill_config(head_dim: int, mode: int, device: torch.device, fp32: bool = False):
    """(block_m, block_n, num_warps, num_stages) for a head_dim, cache mode and operand width."""
    if device.type != "cuda":
        return 32, 32, 4, 1
    if fp32:  # float32 caches (tests, CPU-parity runs): keep shared memory small
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 128, 8, 3  # H200 sweep, L=8k: 359 TFLOP/s vs 316 for (128, 64, 8, 3)


def paged_attention_prefill(query: torch.Tensor, kv_cache: LayerKVCache, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                            sliding_window, max_query_len: int, max_seq_len: int,
                            query_lens_cpu: list[int] | None = None, seq_lens_cpu: list[int] | None = None,
                            *, block_m: int | None = None, block_n: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton varlen causal FlashAttention-2 (Dao 2023) over the paged cache; no host syncs.

    query ``[num_tokens, num_heads, head_dim]`` -> out same shape/dtype. query_start_loc
    ``[num_seqs + 1]`` int32, seq_lens ``[num_seqs]`` int32 (context incl. this chunk, already in
    the cache), block_table ``[num_seqs, max_blocks_per_seq]`` int32. Prefix hits and chunked
    prefill are queries that start mid-context. int8/int4 caches are dequantized in-kernel
    (scales applied to scores / probabilities, so the tensor cores see raw codes).
    """
    _check_attn_args(query, kv_cache, block_table, "paged_attention_prefill")
    mode = kv_mode(kv_cache.dtype)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"paged_attention_prefill: head_dim must be a power of two >= 16, got {head_dim}")
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"paged_attention_prefill: query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], "
                         f"got {tuple(query_start_loc.shape)}")
    if query.stride(-1) != 1 or kv_cache.key.stride() != kv_cache.value.stride():
        raise ValueError("paged_attention_prefill: query last dim must be contiguous and key/value caches "
                         "must share strides")
    cdt, prec = compute_dtype(query, kv_cache)
    ks, vs, kz, vz, sstr = kv_scale_args(kv_cache)
    d_bm, d_bn, d_warps, d_stages = prefill_config(head_dim, mode, query.device, cdt == tl.float32)
    block_m, block_n = block_m or d_bm, block_n or d_bn
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must match query {tuple(query.shape)} {query.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    window = _window(sliding_window)
    kc = kv_cache.key
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    _prefill_kernel[grid](
        query, kc, kv_cache.value, ks, vs, kz, vz, block_table, query_start_loc, seq_lens, out,
        scale * 1.4426950408889634, window,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), sstr[0], sstr[1], sstr[2], block_table.stride(0),
        G=num_heads // kv_cache.num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=kv_cache.block_size, MODE=mode, CDT=cdt, DOT_PREC=prec, HAS_WINDOW=window > 0,
        num_warps=num_warps or d_warps, num_stages=num_stages or d_stages)
    return out
