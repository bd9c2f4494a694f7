"""Warp-specialized register-A wgmma GEMM (Gluon): y = x @ dequant(W)^T, W4, for M >= 64.

Why: quant_gemm_ra (one program = one or two warpgroups) spends ~1500-1850 cycles per K tile at
BLOCK_M 256 / BLOCK_N 128, against 1024 cycles of tensor-core work (s18-2: 4096x14336 M 1024, 208
us = 0.72x cuBLAS). Both warpgroups meet at a CTA barrier every tile before the ring slot is
refilled, and each ends its MMA with ``warpgroup_mma_wait(0)`` (register-A hazard, see
quant_gemm_ra), so the two drain the tensor pipe at the same moment and convert at the same
moment. Here the two warpgroups share nothing but the ring:

- a loader warp (``_rws_load_partition``): the TMA of K tile i (the x tile ``[BLOCK_M, BLOCK_K]``
  and, for each 64-row half of the ``BLOCK_N = 128`` weight rows, its words ``[BLOCK_K / 8, 64]``
  and two scale-table rows) into slot ``i % STAGES`` once both consumers released the slot's
  previous tile (``empty``, two arrivals);
- two consumer warpgroups (``_rws_mma_partition``, C = 0 the default partition, C = 1 a worker),
  each on its own 64 weight rows: quant_gemm_ra's loop (wgmma of tile i from registers, while it
  runs wait for and convert tile i + 1, ``wait(0)`` with both A tiles as dependencies), then
  ``arrive(empty[i % STAGES])``; no CTA barrier. Each stores its own ``[64, BLOCK_M]`` half
  (split-K: its own lock counter, ``2 pid + C``).

Nothing makes the two warpgroups alternate, but nothing holds them together either: once one is
behind, its conversion runs while the other's MMA occupies the tensor cores, as in a ping-pong
schedule. Same weights and products as quant_gemm_ra, so results are bit-identical at equal splits.

Testing as quant_gemm_ra: Gluon does not run under ``TRITON_INTERPRET``; the CPU tests compile the
kernel for sm_90 offline (register-A HGMMA, no spills, no hazard); the GPU tests compare with
``ref_quant_matmul`` and with quant_gemm_ra.
"""

from __future__ import annotations

import torch

from anybit.kernels.quant_gemm_h2 import _lock_buffer, scale_table
from anybit.kernels.quant_gemm_ra import gluon, ra_applies
from anybit.kernels.quant_gemv_h2 import _num_sms, k_split
from anybit.quant.format import PackedWeight

HALF_N = 64  # weight rows per consumer warpgroup (one m64 block)

if gluon is not None:
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from anybit.kernels.quant_gemm_ra import _convert_pairs, _quad_layout
    from anybit.kernels.quant_gemm_wg import _store_tile

    LOAD_REGS: gl.constexpr = gl.constexpr(24)  # the loader warp: scalar TMA coordinates only

    @gluon.jit
    def _rws_load_partition(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, ready, empty, G, K, k_start,
                            n_iters, off_m, off_n):
        """One warp: K tile i into slot i % STAGES (x tile; per half c: words into w_smem[2 stage + c],
        table rows into t_smem[4 stage + 2 c] and [... + 1]) once both consumers released it."""
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        STAGES: gl.constexpr = x_smem.shape[0]
        HN: gl.constexpr = w_desc.block_type.shape[1]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes + 4 * t_desc.block_type.nbytes
        KG = K // G
        for i in range(n_iters):
            stage = i % STAGES
            mbarrier.wait(empty.index(stage), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, nbytes)
            k0 = k_start + i * BLOCK_K
            g = k0 // G
            tma.async_copy_global_to_shared(x_desc, [off_m, k0], bar, x_smem.index(stage))
            for c in gl.static_range(2):
                n0 = off_n + c * HN
                tma.async_copy_global_to_shared(w_desc, [k0 // 8, n0], bar, w_smem.index(2 * stage + c))
                tma.async_copy_global_to_shared(t_desc, [g, n0], bar, t_smem.index(4 * stage + 2 * c))
                tma.async_copy_global_to_shared(t_desc, [KG + g, n0], bar, t_smem.index(4 * stage + 2 * c + 1))

    @gluon.jit
    def _rws_mma_partition(x_smem, w_smem, t_smem, ready, empty, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym,
                           n_iters, split_k, off_m, off_n, pid, pid_k, C: gl.constexpr, SPLIT: gl.constexpr,
                           SUM_LOADS: gl.constexpr):
        """Consumer warpgroup C: weight rows ``off_n + 64 C + [0, 64)`` over all n_iters K tiles, then
        its store (quant_gemm_wg._store_tile; lock counter 2 pid + C)."""
        BLOCK_M: gl.constexpr = x_smem.shape[1]
        STAGES: gl.constexpr = x_smem.shape[0]
        R: gl.constexpr = w_smem.shape[1]
        HN: gl.constexpr = w_smem.shape[2]
        QL: gl.constexpr = _quad_layout(R, HN, 4)
        WL: gl.constexpr = gl.SliceLayout(2, QL)
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        AL: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, QL)))
        sel = gl.expand_dims(gl.expand_dims(q * 0x11 + (q + 4) * 0x1100, 0), 0)  # quant_gemm_ra._ra_selector
        acc = gl.zeros([HN, BLOCK_M], gl.float32, MMA)
        a = _rws_convert(w_smem, t_smem, ready, 0, sel, C, STAGES, WL, AL)
        for i in range(n_iters - 1):
            stage = i % STAGES
            acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            a_next = _rws_convert(w_smem, t_smem, ready, i + 1, sel, C, STAGES, WL, AL)
            acc, a, a_next = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, a_next))
            mbarrier.arrive(empty.index(stage))  # x, words and table of tile i: no longer read
            a = a_next
        acc = warpgroup_mma(a, x_smem.index((n_iters - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        cols = off_n + C * HN + gl.arange(0, HN, layout=gl.SliceLayout(1, MMA))
        _store_tile(acc, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, split_k, off_m, cols, 2 * pid + C, pid_k,
                    SPLIT, SUM_LOADS)

    @gluon.jit
    def _rws_convert(w_smem, t_smem, bars, i, sel, C: gl.constexpr, STAGES: gl.constexpr, WL: gl.constexpr,
                     AL: gl.constexpr):
        """Wait for K tile i's slot, read half C's words and table rows, convert (quant_gemm_ra)."""
        stage = i % STAGES
        mbarrier.wait(bars.index(stage), (i // STAGES) & 1)
        w = w_smem.index(2 * stage + C).load(WL)
        s2 = t_smem.index(4 * stage + 2 * C).load(WL)  # [1, 64]: (s, s) of each column
        c2 = t_smem.index(4 * stage + 2 * C + 1).load(WL)  # ((8 - z) s, ...)
        return _convert_pairs(w, sel, s2, c2, AL)

    @gluon.jit(do_not_specialize=["M", "n_iters", "split_k"])
    def _quant_gemm_rws_kernel(x_desc, w_desc, t_desc, y_ptr, ws_ptr, lock_ptr, M, N, K, G, stride_ym,
                               k_per_split, n_iters, split_k, W0: gl.constexpr, STAGES: gl.constexpr,
                               SPLIT: gl.constexpr, SUM_LOADS: gl.constexpr, CONS_REGS: gl.constexpr,
                               num_warps: gl.constexpr):
        """Tile ``[BLOCK_M, 128]`` of y for one K split of ``k_per_split`` (= n_iters tiles of BLOCK_K).
        Descriptors: x ``[M, K]`` bf16 (block [BLOCK_M, BLOCK_K]; rows >= M read as 0), the int32
        words ``[K / 8, N]`` (block [BLOCK_K / 8, 64]), the int32 half2 table ``[2 K / G, N]`` (block
        [1, 64]); y ``[M, N]`` (row stride stride_ym). num_warps 4 (the default consumer); the second
        consumer runs with CONS_REGS registers per thread, the loader with 24. SPLIT as in
        quant_gemm_ra."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        R: gl.constexpr = w_desc.block_type.shape[0]
        HN: gl.constexpr = w_desc.block_type.shape[1]
        gl.static_assert(num_warps == 4 and W0 == 4 and HN == 64, "one warpgroup per 64 rows; W4")
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_m = gl.cdiv(M, BLOCK_M)
        off_m = (pid % num_m) * BLOCK_M
        off_n = (pid // num_m) * (2 * HN)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(gl.int32, [2 * STAGES, R, HN], w_desc.layout)
        t_smem = gl.allocate_shared_memory(gl.int32, [4 * STAGES, 1, HN], t_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)  # both consumers
        k_start = pid_k * k_per_split
        # the tuples are written out: a tuple kept in a variable loses its constexprs (quant_gemm_ws)
        gl.warp_specialize([
            (_rws_mma_partition, (x_smem, w_smem, t_smem, ready, empty, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym,
                                  n_iters, split_k, off_m, off_n, pid, pid_k, 0, SPLIT, SUM_LOADS)),
            (_rws_mma_partition, (x_smem, w_smem, t_smem, ready, empty, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym,
                                  n_iters, split_k, off_m, off_n, pid, pid_k, 1, SPLIT, SUM_LOADS)),
            (_rws_load_partition, (x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, ready, empty, G, K, k_start,
                                   n_iters, off_m, off_n))],
            [4, 1], [CONS_REGS, LOAD_REGS])


def rws_shared_bytes(bm: int, bk: int, stages: int) -> int:
    """Shared memory of one program: per stage the x tile, two halves of W4 words, four table rows and
    two barriers."""
    return stages * (bm * bk * 2 + 2 * HALF_N * bk // 2 + 4 * HALF_N * 4 + 16)


def rws_split(M: int, N: int, K: int, bm: int, bk: int, sms: int) -> int:
    """Split-K: doubled while the programs still fit one wave (one per SM) and each split keeps >= 8 K
    tiles; none at BLOCK_M 256 (the split-K sum of a 64 x 256 float32 tile spills, quant_gemm_ra)."""
    tiles = -(-M // bm) * -(-N // (2 * HALF_N))
    k_tiles, split = K // bk, 1
    while bm < 256 and tiles * split * 2 <= sms and k_tiles % (split * 2) == 0 and k_tiles // (split * 2) >= 8:
        split *= 2
    return split


def rws_config(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, stages, consumer registers): BLOCK_M the power of two >= M in 64..256 (the
    wgmma's N side), BLOCK_K 64, the most stages (<= 6) that fit, 232 registers for the worker
    consumer (the default one gets what the launch's maxnreg leaves)."""
    bm = max(64, min(256, triton.next_power_of_2(M)))
    stages = next(n for n in range(6, 1, -1) if rws_shared_bytes(bm, 64, n) <= 227 * 1024)
    return bm, 64, stages, 232


def quant_gemm_rws(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_m: int | None = None,
                   stages: int | None = None, split_k: int | None = None, cons_regs: int | None = None,
                   max_regs: int = 168) -> torch.Tensor:
    """y ``[M, N]`` = x ``[M, K]`` (bf16, contiguous, perm applied) @ dequant(W)^T on Hopper, W4, N a
    multiple of 128; the same weights (bf16, rounded once) as quant_gemm_ra. Keywords override
    ``rws_config`` / ``rws_split`` (benchmarks); ``max_regs``: the launch's register cap per thread
    (12 warps x 32 x 168 fills the register file: one program per SM)."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if not ra_applies(packed, M, x) or N % (2 * HALF_N):
        raise ValueError(f"quant_gemm_rws: needs Hopper, bf16 x and a uniform 4-bit weight with N a multiple "
                         f"of 128 and K, group multiples of 64 (got {x.dtype} x, {packed.fmt} {bits}-bit, N {N}, "
                         f"K {K}, G {G})")
    bm, BK, st, regs = rws_config(M)
    BM = block_m or bm
    stages = stages or (st if bm == BM else next(
        (n for n in range(6, 1, -1) if rws_shared_bytes(BM, BK, n) <= 227 * 1024), 2))
    smem = rws_shared_bytes(BM, BK, stages)
    if BM not in (16, 32, 64, 128, 256) or stages < 2 or smem > 227 * 1024 or G % BK or K % BK:
        raise ValueError(f"quant_gemm_rws: block_m {BM} must be a power of two in 16..256, stages >= 2 (got "
                         f"{stages}), shared memory <= 227 KB (got {smem} bytes), K {K} and the group size {G} "
                         f"multiples of {BK}")
    per, split = k_split(K // BK, split_k or rws_split(M, N, K, BM, BK, _num_sms(x.device)))
    tiles = -(-M // BM) * (N // (2 * HALF_N))
    if split > 1:
        ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        locks = _lock_buffer(x.device, 2 * tiles)
    else:
        ws, locks = y, y
    table = scale_table(packed, True).view(2 * (K // G), N)
    sum_loads = 4 if BM * HALF_N // 128 < 64 else 1
    flat = gl.NVMMASharedLayout(0, 32, rank=2)
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BM, BK],
                              gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))
    w_desc = TensorDescriptor(packed.qweight, [K // 8, N], [packed.qweight.stride(0), 1], [BK // 8, HALF_N], flat)
    t_desc = TensorDescriptor(table, [2 * (K // G), N], [N, 1], [1, HALF_N], flat)
    _quant_gemm_rws_kernel[(tiles, split)](
        x_desc, w_desc, t_desc, y, ws, locks, M, N, K, G, y.stride(0), per * BK, per, split, bits, stages,
        split > 1, sum_loads, cons_regs or regs, num_warps=4, maxnreg=max_regs)
    return y
