"""y = x @ dequant(W)^T for any-bit packed weights (anybit/quant/format.py), in Triton.

Two kernels, chosen by M (rows of x) in ``quant_matmul``:

- ``_quant_gemv_kernel`` (small M, memory-bound): one program per (row m, BLOCK_N columns,
  K split); CUDA cores only. A tile of codes ``[BLOCK_K, BLOCK_N]`` lies inside one scale group
  (BLOCK_K divides G), so scale and zero factor out of the K sum:
  ``sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k)``: per code one shift, one mask
  (per slice), an int->float conversion through the 2^23 magic number, and one FMA.
  Split-K fills the GPU when N / BLOCK_N is small; partial sums are added in float32.
- ``_quant_gemm_kernel`` (larger M): dequantizes a ``[BLOCK_K, BLOCK_N]`` tile to x's dtype in
  registers and runs ``tl.dot`` on tensor cores (Marlin / GPTQ-Triton style), with split-K for
  small M.

- ``_quant_gemv_h2_kernel`` (M = 1, uniform 2/4/8 bits, fp16/bf16 x; ``path="gemv_h2"``): packed
  half-precision arithmetic, two codes per instruction; it lives in quant_gemv_h2.py, with its
  two-slice twin ``_quant_gemv_h2s_kernel`` (3/5/6 bits with integer zero points;
  ``gemv_h2_applies`` decides).
- ``_quant_gemm_h2_kernel`` (2 <= M <= 64, uniform 2/4/8 bits, fp16/bf16 x; ``path="gemm"`` with
  ``h2_dequant=True``, the "auto" choice on CUDA): the tensor-core path with packed-half
  dequantization straight into the MMA's registers; it lives in quant_gemm_h2.py.

Codes of a slice of width w are read as whole int32 words: row ``k // (32//w)`` of the slice,
shifted by ``(k % (32//w)) * w`` (the repeated words of a tile come from L1).
"""

from __future__ import annotations

import os

import torch

from anybit.kernels.quant_gemm_h2 import GEMM_H2_BITS, GEMM_H2_MAX_M, GEMM_H2_MIN_M, quant_gemm_h2
from anybit.kernels.quant_gemm_ra import quant_gemm_ra, ra_applies
from anybit.kernels.quant_gemm_rws import quant_gemm_rws, rws_applies
from anybit.kernels.quant_gemm_wg import WG_BITS, quant_gemm_wg, wg_applies
from anybit.kernels.quant_gemm_ws import quant_gemm_ws
from anybit.kernels.quant_gemv_h2 import (  # noqa: F401  (_h2_asm: re-exported for tests)
    _INTERPRET,
    H2_BITS,
    H2_MAX_M,
    _h2_asm,
    _num_sms,
    _pick_block_k,
    _store_row_split_k,
    gemv_h2_applies,
    k_split,
    quant_gemv_h2,
)
from anybit.kernels.quant_gemv_mma import (
    MMA_BITS,
    MMA_HB_BITS,
    MMA_MAX_M,
    MMA_W3_HB,
    g2_applies,
    grid3_applies,
    grid_fits_heavy,
    grid_programs,
    mma_applies,
    mma_config,
    quant_gemv_mma,
)
from anybit.kernels.quant_gemv_tma import quant_gemv_tma, tma_applies
from anybit.quant.format import SLICES, PackedWeight, dequantize

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def ref_quant_matmul(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch oracle. x ``[M, K]`` float -> y ``[M, N]`` in x.dtype (float32 math)."""
    _check_inputs(x, packed, out)
    y = (x.float() @ dequantize(packed, torch.float32).to(x.device).t()).to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def _check_inputs(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"x: expected [M, {packed.in_features}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor, got {x.dtype}")
    if out is not None and (tuple(out.shape) != (x.shape[0], packed.out_features) or out.dtype != x.dtype
                            or out.stride(1) != 1):
        raise ValueError(f"out: expected {x.dtype} [{x.shape[0]}, {packed.out_features}] with unit column "
                         f"stride, got {out.dtype} {tuple(out.shape)} stride {out.stride()}")


if triton is not None:

    @triton.jit
    def _load_codes_planes(q_ptr, stride_qk, k0, offs_n, mask_n, K,
                           W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, BLOCK_K: tl.constexpr):
        """codes ``[BLOCK_K // P0, P0, BLOCK_N]`` (k = k0 + r*P0 + j) with every word of the widest
        slice loaded once; narrower slices are re-read W0/W_s times (from L1)."""
        P0: tl.constexpr = 32 // W0
        R: tl.constexpr = BLOCK_K // P0
        r = tl.arange(0, R)
        j = tl.arange(0, P0)
        w = tl.load(q_ptr + (k0 // P0 + r)[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :],
                    other=0)
        q = (w[:, None, :] >> (j * W0)[None, :, None]) & ((1 << W0) - 1)
        if W1 > 0:
            P1: tl.constexpr = 32 // W1
            D1: tl.constexpr = P1 // P0
            row = (K * W0) // 32 + k0 // P1 + r // D1
            w1 = tl.load(q_ptr + row[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
            sh = ((r % D1) * P0)[:, None] + j[None, :]
            q |= ((w1[:, None, :] >> (sh * W1)[:, :, None]) & ((1 << W1) - 1)) << W0
        if W2 > 0:
            P2: tl.constexpr = 32 // W2
            D2: tl.constexpr = P2 // P0
            row = (K * (W0 + W1)) // 32 + k0 // P2 + r // D2
            w2 = tl.load(q_ptr + row[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
            sh = ((r % D2) * P0)[:, None] + j[None, :]
            q |= ((w2[:, None, :] >> (sh * W2)[:, :, None]) & ((1 << W2) - 1)) << (W0 + W1)
        return q

    @triton.jit
    def _place_codes(w, w1, w2, magic, E: tl.constexpr, J: tl.constexpr,
                     W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
        """Code J of the tile as the float q * 2^E: bits [E, E+W0) of w (the widest slice, kept in
        place), code J of the narrower slices w1/w2 (starting at bit 0) moved next to them, and the
        exponent of 2^23 from ``magic``. Needs E + W0 + W1 + W2 <= 23."""
        t = (w & (((1 << W0) - 1) << E)) | magic
        if W1 > 0:
            S1: tl.constexpr = E + W0 - J * W1
            if S1 >= 0:
                t |= (w1 << S1) & (((1 << W1) - 1) << (E + W0))
            else:
                t |= (w1 >> (-S1)) & (((1 << W1) - 1) << (E + W0))
        if W2 > 0:
            S2: tl.constexpr = E + W0 + W1 - J * W2
            if S2 >= 0:
                t |= (w2 << S2) & (((1 << W2) - 1) << (E + W0 + W1))
            else:
                t |= (w2 >> (-S2)) & (((1 << W2) - 1) << (E + W0 + W1))
        return t.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _dequant_tile_fast(q_ptr, s_ptr, z_ptr, stride_qk, stride_sg, k0, G, offs_n, mask_n, magic,
                           W0: tl.constexpr, BLOCK_K: tl.constexpr):
        """FAST=True (single-slice uniform widths 1/2/4/8; default under "auto" for W2/W4 at
        M <= 16 after the H200 run in quant_matmul_h2.json): dequantized tile
        ``[BLOCK_K, BLOCK_N]`` float32 with codes kept in place,
        ``(w >> h) & (mask << e) | 0x4B000000`` = 2^23 + q*2^e (h = 16 for fields above bit
        23 - W0), and the 2^-e folded into the scale: one shift (constant per position), one LOP3,
        one FADD and one FFMA per code."""
        P0: tl.constexpr = 32 // W0
        R: tl.constexpr = BLOCK_K // P0
        r = tl.arange(0, R)
        j = tl.arange(0, P0)
        w = tl.load(q_ptr + (k0 // P0 + r)[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :],
                    other=0)
        h = tl.where(j * W0 + W0 > 23, 16, 0)
        e = j * W0 - h
        t = ((w[:, None, :] >> h[None, :, None]) & (((1 << W0) - 1) << e)[None, :, None]) | magic
        v = t.to(tl.float32, bitcast=True) - 8388608.0  # q * 2^e
        g = k0 // G
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        c = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e, exact
        w3 = v * (s[None, None, :] * c[None, :, None]) - (z * s)[None, None, :]
        return tl.reshape(w3, [BLOCK_K, w3.shape[2]])

    @triton.jit
    def _codes_to_float(q):
        """Exact int -> float32 for 0 <= q < 2^23: (2^23 + q) as bits, minus 2^23."""
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _load_words(q_ptr, stride_qk, k0, r, offs_n, mask_n, K,
                    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr):
        """Words ``[R, BLOCK_N]`` of each slice for the K tile at k0 (w0: widest slice, one row per
        word; w1/w2: the narrower slices' word holding the same codes, or w0 when absent)."""
        P0: tl.constexpr = 32 // W0
        w0 = tl.load(q_ptr + (k0 // P0 + r)[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :],
                     other=0)
        w1 = w0
        w2 = w0
        if W1 > 0:
            P1: tl.constexpr = 32 // W1
            row1 = (K * W0) // 32 + k0 // P1 + r // (P1 // P0)
            w1 = tl.load(q_ptr + row1[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
        if W2 > 0:
            P2: tl.constexpr = 32 // W2
            row2 = (K * (W0 + W1)) // 32 + k0 // P2 + r // (P2 // P0)
            w2 = tl.load(q_ptr + row2[:, None] * stride_qk + offs_n[None, :], mask=mask_n[None, :], other=0)
        return w0, w1, w2

    @triton.jit
    def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, cb_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G,
                           stride_xm, stride_qk, stride_sg, stride_ym, k_per_split, n_iters,
                           W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                           magic, IS_CB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           SPLIT_K: tl.constexpr, ITERS: tl.constexpr):
        """One row m, BLOCK_N columns, one K split. Works on 2-D ``[R, BLOCK_N]`` word tiles
        (R = BLOCK_K // P0 words of the widest slice, each loaded once; the next tile's words are
        loaded before the current one is used) and unrolls the P0 codes of a word
        (k = k0 + r*P0 + j), so no layout change or reduction happens in the loop. With split-K,
        the last program of a column tile (counted in ``lock_ptr``) adds the float32 partials."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        P0: tl.constexpr = 32 // W0
        R: tl.constexpr = BLOCK_K // P0
        r = tl.arange(0, R)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        x_row = x_ptr + m * stride_xm
        # n_iters * BLOCK_K = k_per_split, which divides K. ITERS (constexpr) is used only under
        # TRITON_INTERPRET, whose runtime loop bounds break with numpy >= 2.4; 0 on GPUs.
        n = ITERS if ITERS > 0 else n_iters
        nw0, nw1, nw2 = _load_words(q_ptr, stride_qk, k_start, r, offs_n, mask_n, K, W0, W1, W2)
        for i in range(0, n):
            k0 = k_start + i * BLOCK_K
            w0, w1, w2 = nw0, nw1, nw2
            k_next = k_start + tl.minimum(i + 1, n - 1) * BLOCK_K  # prefetch (the last one repeats)
            nw0, nw1, nw2 = _load_words(q_ptr, stride_qk, k_next, r, offs_n, mask_n, K, W0, W1, W2)
            g = k0 // G
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            part = tl.zeros([R, BLOCK_N], dtype=tl.float32)
            xs = tl.zeros([R], dtype=tl.float32)
            if IS_CB:
                if W1 > 0:
                    w1 = w1 >> ((r % (32 // W1 // P0)) * (P0 * W1))[:, None]  # row's codes start at bit 0
                if W2 > 0:
                    w2 = w2 >> ((r % (32 // W2 // P0)) * (P0 * W2))[:, None]
                for j in tl.static_range(P0):
                    xj = tl.load(x_row + k0 + r * P0 + j).to(tl.float32)
                    q = (w0 >> (j * W0)) & ((1 << W0) - 1)
                    if W1 > 0:
                        q |= ((w1 >> (j * W1)) & ((1 << W1) - 1)) << W0
                    if W2 > 0:
                        q |= ((w2 >> (j * W2)) & ((1 << W2) - 1)) << (W0 + W1)
                    part += xj[:, None] * tl.load(cb_ptr + q)
                acc += s[None, :] * part
            else:
                # Codes stay in place: bits (w & (mask << e)) | 0x4B000000 are the float 2^23 + q * 2^e
                # (exact while e + bits <= 23), so q * 2^e costs a LOP3 (two with a narrower slice
                # shifted next to it) and one FADD, and the 2^-e goes into x (per row, shared by
                # the columns). Fields above bit 23 - bits are read from w >> 16.
                w0h = w0 >> 16
                if W1 > 0:
                    w1 = w1 >> ((r % (32 // W1 // P0)) * (P0 * W1))[:, None]  # row's codes start at bit 0
                if W2 > 0:
                    w2 = w2 >> ((r % (32 // W2 // P0)) * (P0 * W2))[:, None]
                for j in tl.static_range(P0):
                    xj = tl.load(x_row + k0 + r * P0 + j).to(tl.float32)
                    xs += xj
                    if j * W0 + W0 + W1 + W2 <= 23:
                        v = _place_codes(w0, w1, w2, magic, j * W0, j, W0, W1, W2)
                        part += (xj * (1.0 / (1 << (j * W0))))[:, None] * v
                    else:
                        v = _place_codes(w0h, w1, w2, magic, j * W0 - 16, j, W0, W1, W2)
                        part += (xj * (1.0 / (1 << (j * W0 - 16))))[:, None] * v
                z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                acc += s[None, :] * (part - z[None, :] * xs[:, None])
        _store_row_split_k(tl.sum(acc, axis=0), y_ptr, ws_ptr, lock_ptr, m, pid_n, pid_k, M, N, offs_n,
                           mask_n, stride_ym, SPLIT_K, BLOCK_N)

    @triton.jit
    def _quant_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, cb_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G,
                           stride_xm, stride_qk, stride_sg, stride_ym, k_per_split, n_iters,
                           W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, IS_CB: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr,
                           ITERS: tl.constexpr, FAST: tl.constexpr = False, magic=0x4B000000):
        """Tile ``[BLOCK_M, BLOCK_N]`` of y, one K split: codes of the widest slice loaded once per
        word, dequantized to x's dtype in registers, ``tl.dot`` on tensor cores. SWAP computes
        ``y^T = W x^T`` so the weight tile is the MMA's A operand (M-dimension = BLOCK_N) and the
        few rows of x its N-dimension (small M)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n  # grouped order: programs that share weight tiles run together
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        # n_iters * BLOCK_K = k_per_split, which divides K. ITERS (constexpr) is used only under
        # TRITON_INTERPRET, whose runtime loop bounds break with numpy >= 2.4; 0 on GPUs.
        for i in range(0, ITERS if ITERS > 0 else n_iters):
            k0 = k_start + i * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None],
                        other=0.0)
            if FAST:
                w = _dequant_tile_fast(q_ptr, s_ptr, z_ptr, stride_qk, stride_sg, k0, G, offs_n, mask_n,
                                       magic, W0, BLOCK_K)
            else:
                q = tl.reshape(_load_codes_planes(q_ptr, stride_qk, k0, offs_n, mask_n, K, W0, W1, W2,
                                                  BLOCK_K), [BLOCK_K, BLOCK_N])
                g = k0 // G
                s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                if IS_CB:
                    w = tl.load(cb_ptr + q) * s[None, :]
                else:
                    z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    w = _codes_to_float(q) * s[None, :] - (z * s)[None, :]
            if SWAP:
                acc = tl.dot(tl.trans(w.to(x.dtype)), tl.trans(x), acc)
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        if SWAP:
            acc = tl.trans(acc)
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=mask)
        else:
            ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws + pid_k * M * N, acc, mask=mask)
            lock = lock_ptr + pid
            if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:  # last split of this tile
                tot = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for sk in range(0, SPLIT_K):
                    tot += tl.load(ws + sk * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
                         tot.to(y_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, cb_ptr, w_ptr, N, K, G, n_start, stride_qk, stride_sg, stride_wk,
                        W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, IS_CB: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Dense ``W^T[k, n - n_start]`` in w_ptr's dtype for one ``[BLOCK_K, BLOCK_N]`` tile (the
        large-M path: dequantize once, then a cuBLAS GEMM)."""
        k0 = tl.program_id(0) * BLOCK_K
        offs_n = n_start + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        q = tl.reshape(_load_codes_planes(q_ptr, stride_qk, k0, offs_n, mask_n, K, W0, W1, W2, BLOCK_K),
                       [BLOCK_K, BLOCK_N])
        g = k0 // G
        s = tl.load(s_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if IS_CB:
            w = tl.load(cb_ptr + q) * s[None, :]
        else:
            z = tl.load(z_ptr + g * stride_sg + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            w = _codes_to_float(q) * s[None, :] - (z * s)[None, :]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(w_ptr + offs_k[:, None] * stride_wk + (offs_n - n_start)[None, :],
                 w.to(w_ptr.dtype.element_ty), mask=mask_n[None, :])


# "auto" turns on the tensor-core path's in-place dequantization (fast_dequant) for these widths
# at 2 <= M <= FAST_DEQUANT_MAX_M: measured at M = 16 (H200) 5-17% faster than the default for
# W4 on all four shapes and W2 on three (lm_head W2: 6% slower); no gain for W8.
FAST_DEQUANT_BITS = (2, 4)
FAST_DEQUANT_MAX_M = 16
def dequant_matmul(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None = None,
                   chunk_n: int = 16384) -> torch.Tensor:
    """Large-M path: dequantize ``W^T`` in column chunks of ``chunk_n`` (bounded scratch memory)
    with ``_dequant_kernel`` and multiply with cuBLAS. x ``[M, K]`` (perm already applied)."""
    M, K = x.shape
    N, G = packed.out_features, packed.group_size
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    widths = SLICES[packed.bits] + (0, 0)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    cb = packed.codebook if packed.codebook is not None else packed.scales
    BN, BK = 128, _pick_block_k(G, K, 64)
    for n0 in range(0, N, chunk_n):
        n = min(chunk_n, N - n0)
        wt = torch.empty(K, n, dtype=x.dtype, device=x.device)
        _dequant_kernel[(K // BK, triton.cdiv(n, BN))](
            packed.qweight, packed.scales, zeros, cb, wt, n0 + n, K, G, n0, packed.qweight.stride(0),
            packed.scales.stride(0), wt.stride(0), widths[0], widths[1], widths[2],
            packed.fmt != "uniform", BN, BK, num_warps=4)
        if y.is_contiguous() and n == N:
            torch.mm(x, wt, out=y)
        else:
            y[:, n0:n0 + n].copy_(x @ wt)
    return y


# The packed-half tensor-core kernel is correct on an H100 (tests/quant/test_quant_gemm_h2.py with
# the PTX, session 2) but not yet timed there (--mode tc did not finish inside a 420 s device call),
# so "auto" keeps the measured kernel until a run shows it faster; h2_dequant=True selects it.
GEMM_H2_AUTO = False
# The Gluon wgmma kernel of quant_gemm_wg.py (Hopper, bf16 x, uniform 2/4/8 bits): "auto" takes it
# where it beat the other paths in the H100 runs of session 4 (quant_matmul_wg.json, W4): M 17..384
# on every shape (M 32: 1.2-1.3x cuBLAS vs 0.95-1.04x; M 128: 0.67-0.92x vs 0.47-0.51x), and
# M 2..16 when N <= WG_SMALL_N (QKV 6144x4096: 1.52-1.61x vs 1.20-1.32x; on the MLP shapes and
# lm_head the older kernel is 3-20% faster there for W4) or the width has no mma.sync kernel (W8: on
# 14336x4096 at M 4 / 16 34.5 / 35.6 us against 46.0 / 48.2 on the generic path, lm_head 215 / 213
# against 230 / 231; H100 s11-4, quant_matmul_routes_s11). From M 512 the dequantize + cuBLAS path wins.
WG_AUTO = os.environ.get("ANYBIT_WG", "1") != "0"  # ANYBIT_WG=0: experiments without it
WG_MAX_M = 384
WG_SMALL_N = 8192
WG_WIDE = os.environ.get("ANYBIT_WG_WIDE", "1") != "0"  # 0: the session-10 rule (N <= WG_SMALL_N, all widths)


def wg_chosen(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether "auto" routes this call to the wgmma kernel (WG_AUTO and the ranges above)."""
    routed = mma_routes(packed.bits, M)
    wide_small_m = M <= 16 and packed.out_features > WG_SMALL_N and (routed or not WG_WIDE)
    if not WG_AUTO or M > WG_MAX_M or wide_small_m:
        return False
    return wg_applies(packed, M, x)


# The warp-specialized kernel of quant_gemm_ws.py (same applicability as the wgmma one): "auto"
# takes it for WS_MIN_M <= M <= WS_MAX_M, where it beat the session-4 choice in the H100 run of
# session 5 (quant_matmul_ws_s5_3.json, W4 x cuBLAS, ws vs before): M 64 on 4096x14336 1.14 vs
# 1.06, 14336x4096 1.28 vs 1.05, 6144x4096 0.85 vs 0.76, lm_head 1.51 vs 1.34, W2 1.23 vs 0.95, W8
# 1.01 vs 0.90; M 32 1.42 vs 1.27, 1.43 vs 1.38 (6144x4096: 1.07 vs 1.15). At M <= 16 it is even
# or slower (its TMA ring alone reaches only ~1.5 TB/s: quant_matmul_ws_diag.json), from M 128
# mixed.
WS_AUTO = os.environ.get("ANYBIT_WS", "1") != "0"  # ANYBIT_WS=0: experiments without it
WS_MIN_M, WS_MAX_M = 17, 64


def ws_chosen(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether "auto" routes this call to the warp-specialized kernel (WS_AUTO and the range above)."""
    return WS_AUTO and WS_MIN_M <= M <= WS_MAX_M and wg_applies(packed, M, x)


# The register-A wgmma kernel of quant_gemm_ra.py (W4): "auto" takes it for RA_MIN_M <= M <= RA_MAX_M.
# H100 s12-5 (quant_matmul_ra_s12_final.json, time ra / previous choice, 4096x14336, 14336x4096,
# 6144x4096, lm_head): M 64 39 / 46, 37 / 36, 25 / 29, 241 / 266 us (ws); M 128 49 / 108, 43 / 53, 31 / 34
# (wg); M 256 77 / 111, 60 / 87, 41 / 50, 459 / 653 (wg); M 512 131 / 132, 115 / 141, 60 / 57 (dequant +
# cuBLAS). M 32 is even with ws (35 / 34, 33 / 33, 22 / 22); from M 1024 dequantize + cuBLAS wins on the
# layer shapes (195 / 195, 249 / 212, 120 / 88).
RA_AUTO = os.environ.get("ANYBIT_RA", "1") != "0"  # ANYBIT_RA=0: experiments without it
RA_MIN_M, RA_MAX_M = 64, 512


def ra_chosen(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether "auto" routes this call to the register-A wgmma kernel (RA_AUTO and the range above)."""
    return RA_AUTO and RA_MIN_M <= M <= RA_MAX_M and ra_applies(packed, M, x)


# The warp-specialized register-A kernel of quant_gemm_rws.py (W4, N a multiple of 128; whole tiles or
# stream-K): "auto" takes it from RWS_MIN_M rows, before ra, ws and dequantize + cuBLAS. Interleaved H100
# A/B of s20-4 / s20-8 (quant_matmul_rws_ab_s20_4, quant_matmul_rws4_ab_s20_8), x cuBLAS, rws against the
# previous choice, 14336x4096, 4096x14336, 6144x4096: M 32 1.75 / 1.43, 1.61 / 1.42, 1.27 / 1.09 (ws);
# M 64 1.69 / 1.28, 1.66 / 1.26, 1.28 / 0.87 (ra); M 256 0.92 / 0.86, 0.98 / 0.77, 0.78 / 0.62 (ra); M 1024
# 0.76 / 0.71, 0.82 / 0.75, 0.76 / 0.80 (dequantize + cuBLAS, which needs a scratch copy of the weights).
# At M 16 the mma.sync kernel stays (2.15-2.27 against 1.59-1.68 on the large shapes). Above RWS_MAX_M
# dequantize + cuBLAS wins (s20-11, quant_matmul_rws_ab_s20_11: M 2048 0.87-0.90 against rws 0.75-0.80, M
# 8192 0.93-0.96 against 0.66-0.82); its scratch copy of the weights is the price.
# Session 21: every width of 1..8 bits (ra_slices). Interleaved H100 A/B s21-1 (file
# quant_matmul_rws_slices_ab_s21_1), x cuBLAS on 14336x4096 / 4096x14336 / 6144x4096, rws against the
# previous choice (the Triton GEMM, ws for W2, or dequantize + cuBLAS):
# - W3 M 64 1.48 / 1.48 / 1.20 against 0.74 / 0.76 / 0.61;
#   M 256 0.99 / 0.93 / 0.76 against 0.49 / 0.55 / 0.52;
# - W6 M 64 1.35 / 1.35 / 1.13 against 0.48 / 0.49 / 0.44;
# - W2 M 64 1.71 / 1.69 / 1.35 against 1.38 / 1.16 / 0.83;
# - M 1024: rws wins on the two MLP shapes (W3 0.79 / 0.86 against 0.70 / 0.76) and loses 3-9% on 6144x4096
#   (W3 0.74 against 0.78, W6 0.68 against 0.75), as W4 did (s20-4). It stays there: dequantize + cuBLAS
#   needs a bf16 scratch copy of the weights.
# W8 (s21-3 against the s21-2 matrix): M 64 1.47 / 1.37 / 1.12 against 1.10 / 0.94 / 0.73, M 256 0.90 / 0.82 /
# 0.67 against 0.56 / 0.57 / 0.52.
# M 9..16 where the mma.sync kernel is not chosen (too few K tiles per program: small K, e.g. 6144x4096) and
# the width has no wgmma kernel (not 2/4/8 bits), i.e. the alternative is the Triton GEMM: rws from
# RWS_SLICED_MIN_M (H100 s21-6, quant_matmul_rws_small_m_ab_s21_6, 6144x4096 M 16, x cuBLAS: W3 1.13 against
# 1.03, W5 1.10 against 0.95, W6 1.04 against 0.93).
RWS_AUTO = os.environ.get("ANYBIT_RWS", "1") != "0"  # ANYBIT_RWS=0: experiments without it
RWS_MIN_M, RWS_MAX_M = 17, 1024
RWS_SLICED_MIN_M = 9


def rws_chosen(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether "auto" routes this call to the warp-specialized register-A kernel (RWS_AUTO, RWS_MIN_M <= M <=
    RWS_MAX_M, or from RWS_SLICED_MIN_M for widths without a wgmma kernel; N a multiple of 128 and its
    conditions: uniform 1..8 bits, Hopper, bf16 x, TMA alignment). The launcher asks only where the mma.sync
    kernel was not chosen."""
    low = RWS_SLICED_MIN_M if packed.bits not in WG_BITS else RWS_MIN_M
    return (RWS_AUTO and low <= M <= RWS_MAX_M and packed.out_features % 128 == 0
            and rws_applies(packed, M, x))


# The register-operand mma.sync kernel of quant_gemv_mma.py (bf16 x, uniform 1..7 bits as slices of
# 1/2/4 bits since session 10 (W3/5/6 at M 4-8: 1.8-2.4x cuBLAS, s10-1), integer zero
# points, M <= 16): in the H100 runs of session 6 (quant_matmul_mma_s6_*.json, x cuBLAS, mma vs the
# previous choice) it wins clearly at M 2..8 (W4 M 4: 2.1-2.6 vs 1.4-1.8 on the layer shapes, 3.5 vs
# 2.0 on lm_head; W2 M 4-8: 3.0-3.4 vs 1.6-1.8), at M 9..16 where each program keeps >= 8 K tiles
# (4096x14336 M 16: 1.89 vs 1.76; 6144x4096, 4 K tiles per program: 1.16 vs 1.51), and is within
# -5..+9% of the packed-half GEMV at M = 1, where end to end (e2e_w4_mma_mode*.json, batch 1) the
# GEMV's decode step is faster (372 vs 360 tok/s; batch 8: 2645 vs 1905 with this kernel).
# ANYBIT_MMA=0: off; =1: also M = 1; default 2: M 2..16.
MMA_MODE = os.environ.get("ANYBIT_MMA", "2")
# Widths that take the mma.sync kernel at M = 1 too: 7 bits (three slices) ran 0.74-0.93x cuBLAS on the
# packed-half GEMV at M = 1 on the H100 (s10-1, quant_matmul_slices_s10) against 1.10-1.32x at M 4-8
# on this kernel.
MMA_M1_BITS = (7,)
# Widths that take it at M = 1 where mma_config splits K inside the program (ks > 1, i.e. N small
# enough: not lm_head), for a call that writes y (not for pending sums): on the H100 (s11-1,
# quant_matmul_mma_ks) W4 16.9 / 15.3 / 9.0 us against the packed-half GEMV's 18.3 / 16.9 / 10.2 on
# 4096x14336 / 14336x4096 / 6144x4096, W2 12.3 / 11.5 / 6.3 against 14.5 / 14.0 / 7.6; W3, W5 and W6
# were level or faster on the GEMV. With pending sums (float atomics, no split-K ending: the decode
# step) the GEMV stays: W4 batch-1 decode 453.2 tok/s against 435.1 with this kernel (s11-2).
# s22-1 (quant_matmul_m1_s22_1) again: W3 mma 18.3 / 18.2 / 9.9 us against the GEMV's 16.6 / 15.9 / 9.3.
# ANYBIT_MMA_M1_KS=0: off.
MMA_M1_KS_BITS = (1, 2, 4)
MMA_M1_KS = os.environ.get("ANYBIT_MMA_M1_KS", "1") != "0"
# W3 at M = 1 with its high bits merged (quant_gemv_mma's HB) where the grid fits 3 programs per SM
# uncapped, writing y (pending sums: MMA_HB_PENDING_BITS below); elsewhere the packed-half GEMV. H100 s26-5
# (quant_w3_s26_5, us, merged / two slices / the GEMV's "auto" then): 6144x4096 (384 programs on 396 slots)
# 7.3 / 9.7 / 9.3, pending 7.3 / 9.6; 4096x14336 (512) 18.0 / 18.0 / 16.0, 14336x4096 (448) 16.3 / 17.6 /
# 15.5. W5 / W6 likewise (s26-7, quant_hb_w*_s26_7, 6144x4096 merged / the GEMV: 9.8 / 11.1, 11.4 / 12.3).
# Env ANYBIT_MMA_W3_M1=0: off.
MMA_W3_M1 = os.environ.get("ANYBIT_MMA_W3_M1", "1") != "0"
# Adding into a pending sum at M = 1 (the decode step) none takes that rule: the packed-half GEMV's pending
# form has no split-K ending and was faster where the grid fits. H100 s27-1 / s27-2
# (quant_matmul_m1_pending_s27_*, us, pending GEMV / pending mma.sync, the mma one the route then): 6144x4096
# W3 7.1, 7.0 / 7.3, 7.3; W5 9.1, 9.0 / 9.8, 9.7; W6 10.2, 10.3 / 11.1, 11.3; 4096x4096 W3 5.5 / 6.3, W5 7.4
# / 8.9, W6 8.0 / 7.4 (the one loss). Batch-1 decode (s27-2, W3 still on the rule): W5 346.1 / 344.7, W6
# 354.3 / 352.4 tok/s. Env ANYBIT_MMA_HB_PENDING_BITS=3,5,6: the rule for those widths again.
MMA_HB_PENDING_BITS = tuple(int(b) for b in os.environ.get("ANYBIT_MMA_HB_PENDING_BITS", "").split(",") if b)
# Pending sums at M = 1 of down_proj-like weights (K >= 2 N) take the mma.sync kernel for these widths (W5 its
# two slices): H100 s27-1..4 (quant_matmul_m1_pending_s27_*, quant_matmul_h2acc_s27_*, us on 4096x14336,
# pending mma.sync / pending GEMV): W2 10.2 / 12.4; W5 19.3 / 20.0, 19.3 / 20.2, 18.9 / 19.9, 18.8 / 19.7. W3,
# W4 and W6 stay on the GEMV (13.4-13.8 / 14.8-15.2, 14.4 / 15.1, 20.2-20.5 / 20.9-21.2), as do the other
# shapes. Env ANYBIT_MMA_M1_PENDING_DOWN_BITS (comma list; empty: none).
MMA_M1_PENDING_DOWN_BITS = tuple(
    int(b) for b in os.environ.get("ANYBIT_MMA_M1_PENDING_DOWN_BITS", "2,5").split(",") if b)
# K tiles per program below which M 9..16 keeps the other paths. It was 8, measured when BLOCK_M 16 splits
# assumed 3 programs per SM and short programs ran in two waves; with the true 2 (s22) 4 tiles per program
# win on 4096x4096 (H100 s22-10, M 9 / 16 us, mma split 8 against the previous route: W4 9.0 / 10.8 against
# 11.0 / 11.4, W3 10.6 / 12.5 against 17.7 / 17.1, W6 12.1 / 13.3 against 18.8 / 18.0; W2 M 16 loses, 12.4
# against 10.8).
MMA_MIN_TILES_M16 = 4
# W8 on the mma.sync kernel (float16 MMA, session 23) at M 2..MMA_W8_MAX_M. H100 s23-1 (quant_matmul_w8_s23_1,
# us, mma / mma adding into a pending sum / the wgmma kernel, W8's route before): M 2-4
# 29.6-30.4 / 26.8-27.0 / 31.8-31.9 on 4096x14336, 29.0-29.6 / 27.3-27.5 / 34.6-34.8 on 14336x4096,
# 15.4-15.6 / 13.8-14.0 / 16.6-16.7 on 6144x4096; M 8 32.7 / 28.0 / 31.6, 31.0 / 28.3 / 34.9, 16.6 / 14.7
# / 16.9; from M 12 the wgmma kernel wins (31.1-35.2 against 34.9-37.6). At M = 1 the packed-half GEMV
# stays (26.2 / 27.3 / 14.5 against 28.4 / 27.1 / 15.1). Env ANYBIT_MMA_W8=0: off.
MMA_W8_AUTO = os.environ.get("ANYBIT_MMA_W8", "1") != "0"
MMA_W8_MAX_M = 8
# Writing y (not a pending sum), W8 takes it only up to M 4: s23-11 (quant_matmul_w8_lmhead_s23_11, us, mma
# / wgmma) M 8 on lm_head 221.9 / 210.8 and on 4096x4096 15.0 / 12.8 (as a pending sum 10.2), M 4 213.7 /
# 210.4 and 13.2 / 13.0, M 2 204.5 / 210.8 and 12.7 / 13.1; on the MLP shapes at M 8 (s23-1) 32.7 / 31.6
# and 31.0 / 34.9.
MMA_W8_Y_MAX_M = 4
# W8 at M = 1 writing y: the mma.sync kernel (its unrolled loop) where mma_config needs no split-K (ks > 1,
# split 1), else the packed-half GEMV. H100 s23-6 (us, mma / GEMV): 25.8 / 27.2 on 14336x4096, 13.3 / 14.1-
# 14.7 on 6144x4096; 4096x14336 (split 2) 28.5 / 26.4 stays on the GEMV. Env ANYBIT_MMA_W8_M1=0: off.
MMA_W8_M1 = os.environ.get("ANYBIT_MMA_W8_M1", "1") != "0"
# 4-bit codebook weights (nf4 / fp4 / learned) and 2- / 3-bit ones (learned; 3-bit at M <= 32) at M <= 64
# (MMA_CB_MAX_M): the
# mma.sync kernel with the code table in shared memory (quant_gemv_mma.py's CB), whether writing y or adding
# into a pending sum;
# elsewhere the generic Triton kernels, which look every code up in global memory. H100 s24-1
# (quant_codebook_s24_1, x cuBLAS, M = 1 / 4 / 16): fp4 and learned g128 2.44-2.65 / 2.31-2.42 / 1.35-1.87
# against the generic kernels' 0.69-0.88 / 0.51-0.58 / 0.46-0.58; nf4 g64 1.74-1.91 / 1.99-2.52 / 1.17-1.55.
# Env ANYBIT_MMA_CB=0: off.
MMA_CB_AUTO = os.environ.get("ANYBIT_MMA_CB", "1") != "0"
# M 17..32 on the mma.sync kernel (BLOCK_M 32, scales in the conversion; session 23) for weights up to
# MMA_WIDE_MAX_N x MMA_WIDE_MAX_K (qkv, o_proj; not down_proj's K 14336, where W3 ran 45.7 us pending
# against rws's 32.9, and W4 level): pending sums for every width, y for MMA_WIDE_Y_BITS. H100 s23-3
# (quant_matmul_wide_s23_3, us at M 24 / 32 on 6144x4096, mma writing y / mma pending / rws): W4 18.4
# / 11.4 / 19.8, 14.6 / 11.1 / 18.8; W2 13.0 / 9.7 / 18.4, 13.7 / 10.2 / 17.9; W8 19.9 / 16.9 / 22.4, 20.9 /
# 17.7 / 21.5; W3 18.9 / 15.7 / 19.8, 19.5 / 16.0 / 19.4; W6 20.9 / 17.8 / 21.6, 21.3 / 18.0 / 20.8. On
# the MLP shapes and at M 48-64 (BLOCK_M 64) rws wins everywhere (W4 14336x4096 M 64 28.1 against 41.0).
# Env ANYBIT_MMA_WIDE=0: off.
MMA_WIDE_AUTO = os.environ.get("ANYBIT_MMA_WIDE", "1") != "0"
MMA_WIDE_MAX_M = 32
MMA_WIDE_MAX_N = 8192
MMA_WIDE_MAX_K = 8192
MMA_WIDE_Y_BITS = (2, 4, 8)
# W3 with its high bits merged (quant_gemv_mma's HB, one MMA chain) takes M 17..32 on every shape, writing y
# too. H100 s26-4 (quant_w3_s26_4, M 32, us, merged writing y / pending against "auto" then, rws): 26.2 /
# 22.8 against 32.8 on 4096x14336, 26.6 / 24.5 against 31.0 on 14336x4096, 18.0 / 13.7 against 19.4 on
# 6144x4096 (``mma_wide_chosen``; with ANYBIT_MMA_W3_HB=0 W3 follows the rule above).


def mma_routes(bits: int, M: int = 2, pending: bool = False) -> bool:
    """Whether "auto" may send this width at M <= 16 rows to the mma.sync kernel at all (W8: MMA_W8_AUTO,
    M up to MMA_W8_MAX_M for pending sums, MMA_W8_Y_MAX_M writing y)."""
    w8_max = MMA_W8_MAX_M if pending else MMA_W8_Y_MAX_M
    return bits in MMA_BITS and (bits != 8 or (MMA_W8_AUTO and w8_max >= M))


# Pending sums at M 17..32 take it on every shape for MMA_WIDE_PENDING_BITS too (the MLP shapes: with the
# splits of quant_gemv_mma's ``acc_split``), instead of rws writing y. H100 s27-13
# (quant_matmul_mmaacc_rws_s27_13, us at M 24 / 32, rws writing y / mma.sync pending): gate_up W2 53.4 / 39.6,
# 49.5 / 39.4; W4 58.2 / 44.2, 53.5 / 44.5; W5 64.4 / 53.5, 57.1 / 52.8; down W2 29.0 / 22.2, 29.4 / 22.7; W4
# 29.4 / 24.9, 30.1 / 25.4; W5 34.3 / 26.5, 34.4 / 26.7; W6 36.9 / 33.8, 36.7 / 34.4 (gate_up W6 level: 63.3 /
# 61.2, 61.7 / 62.6).
# Env ANYBIT_MMA_WIDE_PENDING_BITS (comma list; empty: none).
MMA_WIDE_PENDING_BITS = tuple(
    int(b) for b in os.environ.get("ANYBIT_MMA_WIDE_PENDING_BITS", "2,4,5,6").split(",") if b)


# Pending sums at M 33..64 (BLOCK_M 64) on small square weights (o_proj-like: N x K at most
# MMA_SQUARE_PENDING_MAX) for MMA_SQUARE_PENDING_BITS go to the mma.sync kernel instead of rws writing y. H100
# s27-15 (quant_matmul_mmaacc64_s27_15, us at M 48 / 64 on 4096x4096, rws writing y / mma.sync pending at the
# launcher's split): W2 14.99 / 11.10, 14.76 / 11.72; W4 15.15 / 11.96, 15.37 / 12.74; W6 16.95 / 13.35,
# 17.36 / 14.25. On 6144x4096 and the MLP shapes rws stays ahead (W4 qkv M 48 17.43 / 19.58); W3 / W5 (1-bit
# slices) do not run at BLOCK_M 64. Decode at batch 48 / 64 (s28-4): W2 +2.0 / +2.5%, W4 +1.9 / +2.0%, W6
# +1.9 / +1.6%. W6 is left out: there its merged and separate slices round s (q - z) to bf16 differently, and
# short prefills and mixed steps at 33-64 rows moved the tiny engine model's logprobs by up to 0.14 between
# the two (test_gpu_engine_merged_slices_generate_what_separate_slices_do, s28-14). OFF by default: with
# W2 / W4 on, the engine test of pending against ordered sums at batch 40 (tests/kernels/test_decode_chain.py)
# failed 1 run in 3 with a logprob 1.3 off, not a near-tie (s28-16/17), while every kernel reference test of
# the form passed. Narrowed in s29-4..9 (H100; docs/notes_quant.md "Session 29"): it fails in 13 of 13 pytest
# runs, logprobs 0.2-0.8 off at the first differing step, only with PDL and CUDA graphs and the consumers'
# early trigger all on, and only with the rule on for all three output widths of the model; it passes with
# ANYBIT_PDL=0, with enforce_eager, with ANYBIT_PDL_EARLY=0, or with the rule on one or two widths; reading
# the sums past L1 (.cg) did not fix it; the GEMV loads x only after its griddepcontrol.wait (offline SASS).
# Env ANYBIT_MMA_SQUARE_PENDING_BITS (comma list, e.g. "2,4"; empty: none).
MMA_SQUARE_PENDING_BITS = tuple(
    int(b) for b in os.environ.get("ANYBIT_MMA_SQUARE_PENDING_BITS", "").split(",") if b)
MMA_SQUARE_PENDING_MAX = 4096 * 4096


def mma_square_chosen(packed: PackedWeight, M: int, pending: bool) -> bool:
    """The M 33..64 pending-sum rule above (MMA_SQUARE_PENDING_BITS, N x K <= MMA_SQUARE_PENDING_MAX)."""
    small = packed.out_features * packed.in_features <= MMA_SQUARE_PENDING_MAX
    return pending and MMA_WIDE_MAX_M < M <= MMA_MAX_M and small and packed.bits in MMA_SQUARE_PENDING_BITS


def mma_wide_chosen(packed: PackedWeight, M: int, pending: bool) -> bool:
    """The M 17..MMA_WIDE_MAX_M rules above (MMA_WIDE_AUTO, N <= MMA_WIDE_MAX_N, K <= MMA_WIDE_MAX_K; writing
    y only for MMA_WIDE_Y_BITS; pending sums of MMA_WIDE_PENDING_BITS on every shape)."""
    small = packed.out_features <= MMA_WIDE_MAX_N and packed.in_features <= MMA_WIDE_MAX_K
    hb = MMA_W3_HB and packed.bits == 3  # merged W3: every shape, y too
    every = hb or (pending and packed.bits in MMA_WIDE_PENDING_BITS)
    y_ok = pending or hb or packed.bits in MMA_WIDE_Y_BITS
    return MMA_WIDE_AUTO and 16 < M <= MMA_WIDE_MAX_M and (small or every) and y_ok


def mma_chosen(packed: PackedWeight, M: int, x: torch.Tensor, pending: bool = False) -> bool:
    """Whether "auto" routes this call to the mma.sync kernel (MMA_MODE, the M = 1 and M 9..16 rules
    above, and its applicability); ``pending``: a call that adds into a pending sum
    (anybit/layers/pending.py) rather than writing y."""
    if packed.fmt != "uniform":  # 2- to 4-bit codebooks: its shared-table path is the fast one up to M 64
        return MMA_MODE != "0" and MMA_CB_AUTO and mma_applies(packed, M, x)
    if M > 16:
        wide = mma_wide_chosen(packed, M, pending) or mma_square_chosen(packed, M, pending)
        return MMA_MODE != "0" and wide and mma_applies(packed, M, x)
    if MMA_MODE == "0" or not mma_routes(packed.bits, M, pending) or not mma_applies(packed, M, x):
        return False
    if MMA_MODE == "2" and M == 1 and packed.bits not in MMA_M1_BITS:
        down = packed.in_features >= 2 * packed.out_features  # down_proj-like
        if pending and down and packed.bits in MMA_M1_PENDING_DOWN_BITS:
            return True
        _, _, split, ks = mma_config(1, packed.out_features, packed.in_features, packed.group_size,
                                     _num_sms(x.device), bits=packed.bits, g2=g2_applies(packed, 1))
        if packed.bits == 8:  # MMA_W8_M1: where the K split inside the program alone fills the GPU
            return not pending and MMA_W8_M1 and ks > 1 and split == 1
        if packed.bits in MMA_HB_BITS and MMA_W3_M1:  # merged W3 / W5 / W6 where the grid fits 3 per SM
            sms, programs = _num_sms(x.device), grid_programs(packed.out_features, ks, split)
            fits = grid_fits_heavy(programs, sms)
            if pending:
                return fits and packed.bits in MMA_HB_PENDING_BITS
            return fits or grid3_applies(packed.bits, packed.out_features, packed.in_features,
                                         packed.group_size, sms, g2_applies(packed, 1), programs)
        return not pending and MMA_M1_KS and packed.bits in MMA_M1_KS_BITS and ks > 1
    if M > 8:
        _, bk, split, ks = mma_config(M, packed.out_features, packed.in_features, packed.group_size,
                                      _num_sms(x.device), bits=packed.bits, g2=g2_applies(packed, M))
        return packed.in_features // (bk * ks) // split >= MMA_MIN_TILES_M16
    return True


# The TMA-ring variant of that kernel (quant_gemv_tma.py: Hopper, 1/2/4 bits, 4 programs per SM under a
# 128-register cap) for TMA_MIN_M <= M <= 16 on wide weights (N >= TMA_MIN_N). H100 s15-1/2
# (quant_matmul_mma_tma_s15_*, W4 M 16, us, tma / mma): lm_head 123-125 / 152-154, 14336x4096 24.0-24.7 /
# 26.4-26.7; but 4096x14336 26.5-27.0 / 25.6 and M 1-8 level or slower (the ring does not make the loop
# faster: more bytes in flight and contiguous tiles changed nothing; the gain is 4 programs per SM
# at BLOCK_M 16 where quant_gemv_mma's 224 registers allow 2). Since session 16's whole-slice x and
# unrolled loop the mma kernel wins at N 14336 and the ring only from the fused gate_up's 28672 (H100
# s17-6, quant_matmul_mma_tma_n_s17, us mma / tma at M 9 / 12 / 16: W4 14336x4096 20.5 / 21.0, 20.8 /
# 21.9, 21.0 / 23.5; 28672x4096 40.5 / 36.2, 40.3 / 36.4, 40.6 / 37.9; lm_head at M 16 121.7 / 118.0 in
# s17-4), so the ring starts at 16384. Batch-16 W4 decode end to end was level with gate_up on either
# kernel (4754 / 4740 against 4736 / 4747 tok/s, s17-6).
TMA_AUTO = os.environ.get("ANYBIT_MMA_TMA", "1") != "0"
TMA_MIN_M = 9
TMA_MIN_N = int(os.environ.get("ANYBIT_MMA_TMA_MIN_N", "16384"))  # experiments: the N where the ring starts


def tma_chosen(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether "auto" routes this call to the TMA-ring mma.sync kernel (TMA_AUTO and the range above)."""
    wide = TMA_MIN_M <= M <= 16 and packed.out_features >= TMA_MIN_N
    # groups of 64: the mma.sync kernel (64-K tiles) ran lm_head at M 16 in 134.5 us against this kernel's
    # 160.6 (H100 s24-16, quant_codebook_s24_16); the ring was measured with groups of 128
    return TMA_AUTO and wide and packed.group_size != 64 and tma_applies(packed, M, x)


GEMV_MAX_M = 1  # launcher: GEMV kernel up to this many rows, fused dequant + tensor cores above,
DEQUANT_MIN_M = 128  # and from this many rows dequantize to a scratch W^T + cuBLAS
# Codebook weights above the table kernel (M > MMA_CB_MAX_M) dequantize from here: at M 64 the generic GEMM
# ran 0.34-0.42x cuBLAS against dequantize + cuBLAS's 0.43-0.49x on all three layer shapes (H100 s24-5,
# quant_codebook_s24_5), and the GEMM's share grows with M.
CB_DEQUANT_MIN_M = 65


def quant_matmul(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None = None, *,
                 path: str = "auto", block_n: int | None = None, block_k: int | None = None,
                 block_m: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, swap: bool | None = None,
                 fast_dequant: bool | None = None, use_asm: bool | None = None,
                 words_per_asm: int | None = None, h2_dequant: bool | None = None,
                 bf16_codes: bool | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ nothing). x ``[M, K]`` fp16/bf16/fp32, packed ``PackedWeight``
    for ``W [N, K]`` -> y ``[M, N]`` in x.dtype (written into ``out`` when given, e.g. a column
    slice of a fused output). ``path``: "auto" (the TMA-ring mma.sync kernel where ``tma_chosen``, the
    mma.sync kernel where ``mma_chosen``, else the
    packed-half GEMV for M <= H2_MAX_M when the weight is uniform 2/4/8-bit, or 3/5/6-bit with integer
    zero points, and x fp16/bf16 on CUDA, else the GEMV for M <= GEMV_MAX_M, tensor cores above; the Gluon
    warp-specialized register-A kernel where ``rws_chosen``, the register-A wgmma kernel where
    ``ra_chosen``, the wgmma kernel where ``wg_chosen``, the
    warp-specialized one where ``ws_chosen``), "gemv", "gemv_h2",
    "gemm", "wg", "ws" (warp-specialized Gluon kernel, quant_gemm_ws.py, M >= 1), "mma" (register-operand
    mma.sync kernel, quant_gemv_mma.py, M <= 16), "tma" (the same with the weights through a TMA ring,
    quant_gemv_tma.py, Hopper, 1/2/4 bits), "ra" (wgmma with the weights as a register operand,
    quant_gemm_ra.py, W4), "rws" (the same with a loader warp and two consumer warpgroups,
    quant_gemm_rws.py, uniform 1..8 bits, N a multiple of 128), "dequant";
    the block/split/swap keywords override the heuristics (benchmarks); ``use_asm`` (gemv_h2):
    inline PTX (default on CUDA) or plain Triton, ``words_per_asm`` (gemv_h2): words (1 or 2) per
    PTX block, i.e. per float32 conversion; ``fast_dequant`` selects the in-place dequantization
    of the tensor-core path (single-slice
    uniform widths only; None: on under "auto" for FAST_DEQUANT_BITS at M <= FAST_DEQUANT_MAX_M,
    off for an explicit path="gemm"); ``h2_dequant`` (path "gemm") the packed-half tensor-core
    kernel of quant_gemm_h2.py (uniform 2/4/8 bits; None: on under "auto" for GEMM_H2_MIN_M <= M
    <= GEMM_H2_MAX_M with fp16/bf16 x on CUDA, off for an explicit path="gemm"; ``use_asm``:
    inline PTX or its plain-Triton twin, ``bf16_codes``: weights rounded to bf16 instead of f16,
    default for bf16 x at 2/4 bits). ``num_warps``/``num_stages``/``block_*``/``split_k`` apply to
    it as well."""
    if triton is None:
        raise RuntimeError("quant_matmul needs triton; use ref_quant_matmul")
    _check_inputs(x, packed, out)
    M, K = x.shape
    N, G = packed.out_features, packed.group_size
    if packed.qweight.device != x.device:
        raise ValueError(f"packed weight on {packed.qweight.device}, x on {x.device}")
    if M == 0:
        return out if out is not None else torch.empty(0, N, dtype=x.dtype, device=x.device)
    if packed.perm is not None:
        x = x.index_select(1, packed.perm)
    x = x.contiguous()
    widths = SLICES[packed.bits] + (0, 0)
    is_cb = packed.fmt != "uniform"
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    cb = packed.codebook if packed.codebook is not None else packed.scales
    if path == "auto" and tma_chosen(packed, M, x):
        path = "tma"
    if path == "auto" and mma_chosen(packed, M, x):
        path = "mma"
    if path == "auto":
        h2 = gemv_h2_applies(packed, M, x.dtype, x.is_cuda and not _INTERPRET)
        dense = (CB_DEQUANT_MIN_M if is_cb else DEQUANT_MIN_M) <= M  # dequantize + cuBLAS
        path = "gemv_h2" if h2 else "gemv" if M <= GEMV_MAX_M else "dequant" if dense else "gemm"
        if path != "gemv_h2" and rws_chosen(packed, M, x):
            path = "rws"
        elif path != "gemv_h2" and ra_chosen(packed, M, x):
            path = "ra"
        elif path != "gemv_h2" and ws_chosen(packed, M, x):
            path = "ws"
        elif path != "gemv_h2" and wg_chosen(packed, M, x):
            path = "wg"
        if path == "gemm" and h2_dequant is None:
            h2_dequant = GEMM_H2_AUTO and (GEMM_H2_MIN_M <= M <= GEMM_H2_MAX_M and not is_cb
                                           and packed.bits in GEMM_H2_BITS and x.is_cuda and not _INTERPRET
                                           and x.dtype in (torch.float16, torch.bfloat16))
        if path == "gemm" and fast_dequant is None:
            fast_dequant = packed.bits in FAST_DEQUANT_BITS and M <= FAST_DEQUANT_MAX_M
    if path == "dequant":
        return dequant_matmul(x, packed, out)
    if path == "wg":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemm_wg(x, packed, y, block_m=block_m, block_n=block_n, block_k=block_k,
                             stages=num_stages, num_warps=num_warps, split_k=split_k)
    if path == "ra":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemm_ra(x, packed, y, block_m=block_m, block_n=block_n, block_k=block_k,
                             stages=num_stages, num_warps=num_warps, split_k=split_k)
    if path == "rws":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemm_rws(x, packed, y, block_m=block_m, stages=num_stages)
    if path == "mma":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemv_mma(x, packed, y, block_k=block_k, split_k=split_k)
    if path == "tma":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemv_tma(x, packed, y, split_k=split_k)
    if path == "ws":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemm_ws(x, packed, y, block_m=block_m, block_n=block_n, block_k=block_k,
                             stages=num_stages, split_k=split_k)
    if path == "gemv_h2":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemv_h2(x, packed, y, block_n=block_n, block_k=block_k, split_k=split_k,
                             num_warps=num_warps, use_asm=use_asm, words_per_asm=words_per_asm)
    if path == "gemm" and h2_dequant:
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemm_h2(x, packed, y, block_m=block_m, block_n=block_n, block_k=block_k,
                             split_k=split_k, num_warps=num_warps, num_stages=num_stages, use_asm=use_asm,
                             bf16_codes=bf16_codes)
    sms = _num_sms(x.device)
    if path == "gemv":
        BN = block_n or 128
        BK = _pick_block_k(G, K, block_k or 128)
        tiles = triton.cdiv(N, BN) * M
        warps, stages = num_warps or 4, num_stages or 1
    elif path == "gemm":
        if swap is None:
            swap = M <= 64
        BM = block_m or (16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128)
        BN = block_n or (128 if M <= 64 else 128)
        BK = _pick_block_k(G, K, block_k or (128 if M <= 64 else 64))
        tiles = triton.cdiv(N, BN) * triton.cdiv(M, BM)
        warps, stages = num_warps or (4 if M <= 64 else 8), num_stages or (4 if M <= 64 else 3)
    else:
        raise ValueError(f"path: got {path!r}, allowed: auto, gemv, gemv_h2, gemm, wg, ws, ra, rws, mma, "
                         "tma, "
                         "dequant")
    k_tiles = K // BK
    if split_k is None:  # enough programs to fill the GPU ~4 times over
        split_k = max(1, min(k_tiles, (4 * sms + tiles - 1) // tiles)) if tiles < 2 * sms else 1
    per, split_k = k_split(k_tiles, split_k)
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if split_k > 1:
        ws = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        locks = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    else:
        ws, locks = y, y
    args = (x, packed.qweight, packed.scales, zeros, cb, y, ws, locks)
    iters = per if _INTERPRET else 0
    fast = bool(fast_dequant) and not is_cb and widths[1] == 0  # experimental, single-slice uniform
    if path == "gemv":
        grid = (M, triton.cdiv(N, BN), split_k)
        _quant_gemv_kernel[grid](*args, M, N, K, G, x.stride(0), packed.qweight.stride(0),
                                 packed.scales.stride(0), y.stride(0), per * BK, per,
                                 widths[0], widths[1], widths[2], 0x4B000000, is_cb, BN, BK, split_k, iters,
                                 num_warps=warps, num_stages=stages)
    else:
        grid = (tiles, split_k)
        _quant_gemm_kernel[grid](*args, M, N, K, G, x.stride(0), packed.qweight.stride(0),
                                 packed.scales.stride(0), y.stride(0), per * BK, per,
                                 widths[0], widths[1], widths[2], is_cb, BM, BN, BK, 8, split_k, swap,
                                 iters, fast, num_warps=warps, num_stages=stages)
    return y
