"""Dense fp16/bf16 GEMV for decode (M = 1..4): ``y = x @ W^T (+ b)``, W in the ``nn.Linear`` layout.

Memory-bound design (the weight is read once, at copy bandwidth if possible): program
``(0, pid_n, pid_k)`` owns BLOCK_N rows of W and one K range. The weight tile is loaded as
``[BLOCK_K // 8, BLOCK_N, 8]`` with the last axis contiguous, so each thread issues 16-byte loads
(LDG.E.128) and sums its 8 products in registers; the float32 accumulator is ``[BLOCK_K // 8,
BLOCK_N]`` and the cross-thread sum happens once, after the loop. The next tile is requested
before the current one is used (register prefetch), the first one before ``gdc_wait()`` (PDL: x is
written by the previous kernel, W is not). Enough programs to fill every SM in one wave: split-K
when N / BLOCK_N tiles are too few, partials added by the last program of a tile
(``_store_row_split_k`` and its self-resetting counters, shared with quant_gemv_h2). Small M
(<= 4) reuses each weight tile for every row of x (one accumulator per row).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from anybit.kernels.pdl import pdl_enabled

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    from anybit.kernels.quant_gemv_h2 import _num_sms, _store_row_split_k, one_wave_split, split_k_counters
except ImportError:  # pragma: no cover
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GEMV_MAX_M = 4


def ref_gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x ``[M, K]``, weight ``[N, K]``, bias ``[N]`` or None -> y ``[M, N]`` in x's dtype (float32 math)."""
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


if triton is not None:
    @triton.jit
    def _ld(p, k, kv3, K, EVEN_K: tl.constexpr):
        """A ``[KV, BLOCK_N, 8]`` tile at K offset k (chunks past K read as zero unless EVEN_K)."""
        if EVEN_K:
            return tl.load(p)
        else:
            return tl.load(p, mask=(k + kv3) < K, other=0.0)

    @triton.jit
    def _gemv_bf16_kernel(x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_wn,
                          stride_ym, k_per_split, MB: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          EVEN_K: tl.constexpr, PDL: tl.constexpr = False):
        """``y[m, n] = sum_k x[m, k] W[n, k] (+ b[n])`` for MB rows of x, BLOCK_N rows of W, one K split
        of ``k_per_split`` (a multiple of BLOCK_K). Rows past N are clamped to N - 1 (loads stay in
        bounds without a mask; the store is masked); EVEN_K (K % BLOCK_K == 0): no K mask at all."""
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        KV: tl.constexpr = BLOCK_K // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        kv = tl.arange(0, KV)
        # tiles are [KV, BLOCK_N, 8] (chunk, row, element): with the chunk axis first Triton lays a
        # warp along one row's 32 chunks (512 contiguous bytes per load at BLOCK_K = 256)
        offs_k = (kv[:, None] * 8 + tl.arange(0, 8)[None, :])[:, None, :]  # [KV, 1, 8]
        kv3 = (kv * 8)[:, None, None]  # chunk starts, for the K mask (constant over the 8-vector)
        k_start = pid_k * k_per_split
        n = tl.minimum(k_per_split, K - k_start + BLOCK_K - 1) // BLOCK_K
        wp = w_ptr + rows[None, :, None] * stride_wn + k_start + offs_k
        # x as [KV, BLOCK_N, 8] with a zero row stride: the same layout as the weight tile
        zero_n = (offs_n * 0)[None, :, None]
        xp = x_ptr + zero_n + k_start + offs_k
        w = _ld(wp, k_start, kv3, K, EVEN_K)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc0 = tl.zeros([KV, BLOCK_N], dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        for i in range(0, n):
            k0 = k_start + i * BLOCK_K
            step = tl.where(i + 1 < n, BLOCK_K, 0)
            wp += step
            wn = _ld(wp, k0 + step, kv3, K, EVEN_K)  # the next tile (the last request repeats)
            # x (L1/L2 hits) is waited for while the weight tile requested one iteration ago arrives
            wf = w.to(tl.float32)
            acc0 += tl.sum(wf * _ld(xp, k0, kv3, K, EVEN_K).to(tl.float32), axis=2)
            if MB > 1:
                acc1 += tl.sum(wf * _ld(xp + stride_xm, k0, kv3, K, EVEN_K).to(tl.float32), axis=2)
            if MB > 2:
                acc2 += tl.sum(wf * _ld(xp + 2 * stride_xm, k0, kv3, K, EVEN_K).to(tl.float32), axis=2)
            if MB > 3:
                acc3 += tl.sum(wf * _ld(xp + 3 * stride_xm, k0, kv3, K, EVEN_K).to(tl.float32), axis=2)
            xp += BLOCK_K
            w = wn
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_BIAS:  # the bias rides on split 0's partial
            bias = tl.where(pid_k == 0, tl.load(b_ptr + rows).to(tl.float32), 0.0)
        _store_row_split_k(tl.sum(acc0, axis=0) + bias, y_ptr, ws_ptr, lock_ptr, 0, pid_n, pid_k, M, N,
                           offs_n, mask_n, stride_ym, SPLIT_K, BLOCK_N)
        if MB > 1:
            _store_row_split_k(tl.sum(acc1, axis=0) + bias, y_ptr, ws_ptr, lock_ptr, 1, pid_n, pid_k, M, N,
                               offs_n, mask_n, stride_ym, SPLIT_K, BLOCK_N)
        if MB > 2:
            _store_row_split_k(tl.sum(acc2, axis=0) + bias, y_ptr, ws_ptr, lock_ptr, 2, pid_n, pid_k, M, N,
                               offs_n, mask_n, stride_ym, SPLIT_K, BLOCK_N)
        if MB > 3:
            _store_row_split_k(tl.sum(acc3, axis=0) + bias, y_ptr, ws_ptr, lock_ptr, 3, pid_n, pid_k, M, N,
                               offs_n, mask_n, stride_ym, SPLIT_K, BLOCK_N)


# launcher defaults (overridable per call by keyword; the benchmark sweeps them)
BLOCK_N = 16
BLOCK_K = 256
NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # resident programs per SM the split-K choice aims to fill (one wave)


def gemv_config(N: int, K: int, M: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps) of the launcher for an ``[N, K]`` weight and M rows of x."""
    return BLOCK_N, BLOCK_K, NUM_WARPS


def gemv_maxnreg(block_n: int, block_k: int, warps: int, M: int) -> int | None:
    """Register cap passed to ptxas (None: none). Offline sm_90 compiles (ptxas of Triton 3.6): at
    <= 32 weight elements per thread and M <= 2 ptxas left alone chose 48 registers plus a 16-byte
    stack for the accumulators (BLOCK_N 16 x BLOCK_K 256, 4 warps, no split), local loads in the
    loop; capped at 64 it uses 64 and no stack. Larger tiles and M compile without a stack uncapped
    (72-96 registers); a cap of 64 would spill them."""
    return 64 if block_n * block_k <= 32 * 32 * warps and M <= 2 else None


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
              out: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
              num_warps: int | None = None, split_k: int | None = None, programs_per_sm: int | None = None,
              pdl: bool | None = None, maxnreg: int | None = 0) -> torch.Tensor:
    """Triton GEMV: x ``[M, K]`` (M <= 4, last dim contiguous), weight ``[N, K]`` (K contiguous, the
    ``nn.Linear`` layout), fp16/bf16 of the same dtype, bias ``[N]`` or None -> y ``[M, N]`` in x's
    dtype, ``y = x W^T + b`` accumulated in float32 (as ``ref_gemv_bf16``). ``block_n``/``block_k``
    (powers of two, block_k >= 8) and ``num_warps``: tile and warps (defaults: ``gemv_config``);
    ``split_k``: K splits (None: the largest that keeps ``tiles * split`` within
    ``programs_per_sm`` (default ``PROGRAMS_PER_SM``) x SMs, i.e. one wave); ``pdl``:
    programmatic dependent launch (None: where anybit/kernels/pdl.py enables it); ``maxnreg``: ptxas
    register cap (0: ``gemv_maxnreg``'s choice, None: no cap)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv_bf16: x [M, K] and weight [N, K] expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    M, K = x.shape
    N = weight.shape[0]
    if not 1 <= M <= GEMV_MAX_M:
        raise ValueError(f"gemv_bf16: M must be in 1..{GEMV_MAX_M}, got {M}")
    if weight.dtype not in (torch.float16, torch.bfloat16) or x.dtype != weight.dtype:
        raise ValueError(f"gemv_bf16: fp16/bf16 x and weight of one dtype expected, got {x.dtype} and "
                         f"{weight.dtype}")
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("gemv_bf16: x and weight must be contiguous along K")
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise ValueError(f"gemv_bf16: bias must be a contiguous [N={N}], got {tuple(bias.shape)}")
    auto_bn, auto_bk, auto_w = gemv_config(N, K, M)
    BN, BK, warps = block_n or auto_bn, block_k or auto_bk, num_warps or auto_w
    if BK < 8 or BK & (BK - 1) or BN & (BN - 1):
        raise ValueError(f"gemv_bf16: block_n / block_k must be powers of two (block_k >= 8), got {BN}/{BK}")
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if y.shape != (M, N) or y.stride(1) != 1:
        raise ValueError(f"gemv_bf16: out must be [M={M}, N={N}] contiguous along N")
    num_n = triton.cdiv(N, BN)
    k_tiles = triton.cdiv(K, BK)
    if split_k is None:
        split_k = one_wave_split(num_n, k_tiles, (programs_per_sm or PROGRAMS_PER_SM) * _num_sms(x.device))
    per = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    split_k = triton.cdiv(k_tiles, per)  # every split gets at least one tile
    if split_k > 1:
        ws = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        locks = split_k_counters(x.device, M * num_n)
    else:
        ws, locks = y, y
    pdl = pdl_enabled(x.device, pdl)
    extra = {"launch_pdl": True} if pdl else {}
    if maxnreg == 0:
        maxnreg = gemv_maxnreg(BN, BK, warps, M)
    if maxnreg and x.is_cuda and not _INTERPRET:
        extra["maxnreg"] = maxnreg
    _gemv_bf16_kernel[(1, num_n, split_k)](
        x, weight, bias if bias is not None else y, y, ws, locks, M, N, K, x.stride(0), weight.stride(0),
        y.stride(0), per * BK, M, BN, BK, split_k, bias is not None, K % BK == 0, pdl,
        num_warps=warps, num_stages=1, **extra)
    return y
