"""Split-K partials summed by a second kernel instead of the last program of each tile.

A split-K GEMV writing y usually ends in its own programs: each stores its float32 partial, passes a
fence and a counter atomic, and the tile's last program loads every partial, adds them and writes y
(``_store_row_split_k`` in quant_gemv_h2.py, ``_store_tile`` in quant_gemm_wg.py). That is a fence,
an atomic round trip and a dependent reload on the critical path of every call (docs/notes_quant.md,
sessions 6, 11, 22, 27: 1-4 us per standalone call). Deferred (the h2 kernels' ``DEFER`` constexpr, the
mma.sync kernel's run-time ``defer_sum``), the GEMV's programs only store their partials ``ws [split, M,
N]`` and exit; ``split_k_sum`` then adds them in split order and writes y. Launched with PDL after a
PDL GEMV, its programs become resident while the GEMV runs and wait (``griddepcontrol.wait``) for the
GEMV's grid to complete, so the hand-over is one grid completion instead of a fence and an atomic per
program. The order of the additions is fixed (split 0, 1, ...), so results are the same every call.
"""

from __future__ import annotations

import os

import torch

from anybit.kernels.pdl import pdl_enabled

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# One warp per program, four float32 outputs per thread (16-byte loads), at most SUM_PER_SM programs per SM
# (then some take several blocks). H100 s30-1 / s30-2 (quant_matmul_defer_s30_*, two calls): at most one
# program per SM (4 warps, up to 16 outputs per thread) was slower than these small programs in 31 of 54 cases
# at M 1-16, by more than 3% in 24 (6144x4096 M 16 W2-W6 13.5-16.1 us against 10.2-12.7).
SUM_WARPS = 1
SUM_PER_THREAD = 4
SUM_PER_SM = 16
# Where the split-K launchers end with this kernel by default instead of each tile's last program
# (``defer_default``): "auto" (the widths below), "kernel" (every split-K call writing y) or "last" (none).
# Env ANYBIT_SPLIT_SUM.
SPLIT_SUM_MODE = os.environ.get("ANYBIT_SPLIT_SUM", "auto")
# auto: the mma.sync kernel for these (M range, widths), the packed-half GEMV (M = 1) for DEFER_H2_BITS. H100
# s30-1..11 (quant_matmul_defer_s30_*, us, last program / this kernel):
# - M 2..16 (s30-11, the deferral a run-time argument of the kernel's one compile): W4 M 4 17.3 / 15.1
#   (4096x14336), 17.1 / 15.3 (14336x4096), 10.5 / 8.5; M 16 20.9 / 18.2, 21.0 / 18.5, 12.9 / 9.9; W2 M 16
#   20.1 / 16.5, 14.0 / 10.3. (With the deferral a constexpr, W2 lost: its kernel compiled to 94 instead of
#   120 registers and a longer loop, M 4 13.4 / 15.3 us, s30-3.)
# - M 17..32 (BLOCK_M 32; qkv / o_proj, and merged W3 on every shape): W2 / W3 / W4 / W8 1.1-3.1 us faster
#   (6144x4096 M 24 W3 17.2 / 14.3, 4096x4096 M 32 W8 18.9 / 15.8), s30-9.
# - M = 1: the K-split (KS) kernel of W2 / W4, split 2 on 4096x14336 only: 0.4-0.9 / 0-0.7 us faster in five
#   calls. The GEMV: only W8 gained on the MLP shapes (4096x14336 26.7 / 25.5, 26.1 / 25.3); W5 lost there
#   (19.6 / 20.5), W3 was mixed.
DEFER_MMA = ((1, 1, (2, 4)), (2, 32, (2, 3, 4, 5, 6, 8)))
DEFER_H2_BITS = (8,)


def defer_default(kernel: str, bits: int, M: int) -> bool:
    """Whether a split-K call of ``kernel`` ("mma": quant_gemv_mma, "h2": quant_gemv_h2) writing y ends with
    split_k_sum (SPLIT_SUM_MODE and the auto rule above)."""
    if SPLIT_SUM_MODE in ("kernel", "last"):
        return SPLIT_SUM_MODE == "kernel"
    if kernel == "mma":
        return any(lo <= M <= hi and bits in widths for lo, hi, widths in DEFER_MMA)
    return bits in DEFER_H2_BITS


def ref_split_k_sum(ws: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y ``[M, N]`` (any float dtype, rows may be strided) = the float32 partials ``ws [split, M, N]``
    added in split order (split 0 first), rounded to y's dtype once."""
    tot = ws[0].float().clone()
    for s in range(1, ws.shape[0]):
        tot += ws[s].float()
    y.copy_(tot.to(y.dtype))
    return y


if triton is not None:
    @triton.jit
    def _split_k_sum_kernel(ws_ptr, y_ptr, M, N, stride_ym, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
        """Grid (programs,): the ``M N`` outputs in blocks of BLOCK (flat index ``m N + n``), block i taken
        by program ``i % programs``; each output ``sum_s ws[s, m, n]`` in split order into y. PDL: the next
        kernel may launch at once (it waits for this grid before reading y); the partials are read only
        after the GEMV's grid has completed."""
        pid = tl.program_id(0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        total = M * N
        for start in range(pid * BLOCK, total, tl.num_programs(0) * BLOCK):
            idx = start + tl.arange(0, BLOCK)
            mask = idx < total
            tot = tl.load(ws_ptr + idx, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                tot += tl.load(ws_ptr + s * total + idx, mask=mask, other=0.0, cache_modifier=".cg")
            m = idx // N
            tl.store(y_ptr + m * stride_ym + (idx - m * N), tot.to(y_ptr.dtype.element_ty), mask=mask)


def split_k_sum(ws: torch.Tensor, y: torch.Tensor, pdl: bool | None = None) -> torch.Tensor:
    """y ``[M, N]`` (rows ``y.stride(0)`` apart, unit column stride) = ``ws [split, M, N]`` (float32,
    contiguous) summed in split order, as ``ref_split_k_sum``. ``pdl``: launched as a programmatic
    dependent of the kernel before it (None: where anybit/kernels/pdl.py enables it)."""
    split, M, N = ws.shape
    if ws.dtype != torch.float32 or not ws.is_contiguous():
        raise ValueError(f"split_k_sum: ws must be a contiguous float32 [split, M, N] tensor, got {ws.dtype} "
                         f"{tuple(ws.shape)}")
    if y.shape != (M, N) or y.stride(1) != 1:
        raise ValueError(f"split_k_sum: y must be [{M}, {N}] with contiguous rows, got {tuple(y.shape)} "
                         f"strides {y.stride()}")
    if triton is None or not (ws.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return ref_split_k_sum(ws, y)
    from anybit.kernels.quant_gemv_h2 import _num_sms  # (quant_gemv_h2 imports this module)

    pdl = pdl_enabled(ws.device, pdl)
    block = 32 * SUM_WARPS * SUM_PER_THREAD  # outputs per program and pass
    programs = min(triton.cdiv(M * N, block), SUM_PER_SM * _num_sms(ws.device))
    _split_k_sum_kernel[(programs,)](ws, y, M, N, y.stride(0), split, block, pdl, num_warps=SUM_WARPS,
                                     **({"launch_pdl": True} if pdl else {}))
    return y
