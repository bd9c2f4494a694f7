"""Warp-specialized Hopper GEMM for packed 2/4/8-bit weights (Gluon): y = x @ dequant(W)^T, M >= 1.

Why: in ``quant_gemm_wg`` every warp runs one serial chain per K tile (wait for the TMA, load the
words, convert, store the A tile, fence, CTA barrier, wgmma, issue the next TMA); with 2-3
programs per SM that chain (~0.8 us per tile) and not the memory limits the kernel. Here the
chain is cut into partitions that talk through mbarriers only, so each runs at its own rate:

- a loader warp: the TMA of tile i (x tile, words, the two scale-table rows of its group; one
  ``raw_ready`` barrier per slot) into slot ``i % STAGES`` once ``raw_empty`` says both users of
  the slot's previous tile are done with it;
- ``NCONV`` converter partitions of 4 warps; partition c takes tiles c, c + NCONV, ...: wait for
  the slot's TMA, words and table rows to registers, fence, arrive ``raw_empty``,
  ``_convert_words`` (quant_gemm_wg's PTX: bf16 ``s (q - z)`` rounded once), wait until the A
  slot is free, store it in the wgmma's swizzled layout, fence, arrive ``a_ready``;
- the default partition (``BLOCK_N / 64`` warpgroups, 64 weight rows each): the wgmma of tile i
  on A slot ``i % A_STAGES`` and x slot ``i % STAGES``, ``warpgroup_mma_wait(1)``, then tile
  i - 1 is complete: arrive ``a_empty`` and ``raw_empty`` (its x); the epilogue (split-K sum by
  the last program of a tile, as in quant_gemm_wg).

Why the loader is its own warp: in the first version the wgmma warpgroup issued the TMA; Nsight
Compute (H100, W4 4096x14336, M 16) counted 770 warp instructions per tile in that partition
against 497 in the converter, 0.67 issued per scheduler per cycle: the kernel was issue-bound
at ~1.1 TB/s. BLOCK_K 128 halves the per-weight cost of waits, arrives and TMA issue again.
M = 1..7 run as BLOCK_M 8 (wgmma N = 8; the TMA reads rows >= M as zeros).

Testing as quant_gemm_wg: Gluon does not run under ``TRITON_INTERPRET``; the CPU tests compile
the kernel for sm_90 offline, the GPU tests compare with ``ref_quant_matmul``.
"""

from __future__ import annotations

import torch

from anybit.kernels.quant_gemm_h2 import _lock_buffer, scale_table
from anybit.kernels.quant_gemm_wg import gluon, wg_applies
from anybit.kernels.quant_gemv_h2 import _num_sms, k_split
from anybit.quant.format import PackedWeight

if gluon is not None:
    import triton
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from anybit.kernels.quant_gemm_wg import (
        _convert_words,
        _issue_tile,
        _store_tile,
        _tile_cols,
        _word_layout,
    )

    LOAD_REGS: gl.constexpr = gl.constexpr(24)  # the loader warp: scalar TMA coordinates only

    @gluon.jit
    def _ws_load_partition(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, raw_ready, raw_empty, G, K,
                           k_start, n_iters, off_m, off_n, W0: gl.constexpr):
        """One warp: the TMA of every K tile into slot i % STAGES once both consumers of the tile
        that held it (converter: words and table in registers; wgmma: done with x) released it."""
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        STAGES: gl.constexpr = x_smem.shape[0]
        for i in range(n_iters):
            stage = i % STAGES
            mbarrier.wait(raw_empty.index(stage), ((i // STAGES) & 1) ^ 1)
            _issue_tile(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, raw_ready, stage,
                        k_start + i * BLOCK_K, off_m, off_n, G, K // G, True, 32 // W0)

    @gluon.jit
    def _ws_mma_partition(x_smem, a_smem, raw_ready, raw_empty, a_ready, a_empty, y_ptr, ws_ptr, lock_ptr, M,
                          N, stride_ym, n_iters, split_k, off_m, off_n, pid, pid_k, SPLIT: gl.constexpr,
                          DIAG: gl.constexpr):
        """wgmma of every K tile (one group left in flight), releases, epilogue."""
        BLOCK_M: gl.constexpr = x_smem.shape[1]
        BLOCK_N: gl.constexpr = a_smem.shape[1]
        STAGES: gl.constexpr = x_smem.shape[0]
        A_STAGES: gl.constexpr = a_smem.shape[0]
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        for i in range(n_iters):
            stage = i % STAGES
            ai = i % A_STAGES
            mbarrier.wait(raw_ready.index(stage), (i // STAGES) & 1)
            mbarrier.wait(a_ready.index(ai), (i // A_STAGES) & 1)
            if (DIAG & 2) == 0:
                acc = warpgroup_mma(a_smem.index(ai), x_smem.index(stage).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # the wgmma of tile i - 1 is complete: its A slot and (for x) its TMA slot are free
            mbarrier.arrive(a_empty.index((i + A_STAGES - 1) % A_STAGES), pred=i > 0)
            mbarrier.arrive(raw_empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        cols = _tile_cols(acc, off_n)
        _store_tile(acc, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, split_k, off_m, cols, pid, pid_k, SPLIT,
                    2)  # 80 registers in this partition: 8 loads would spill

    @gluon.jit
    def _ws_convert_partition(w_smem, t_smem, a_smem, raw_ready, raw_empty, a_ready, a_empty, n_iters,
                              FIRST: gl.constexpr, NCONV: gl.constexpr, W0: gl.constexpr, DIAG: gl.constexpr):
        """Tiles FIRST, FIRST + NCONV, ...: words -> bf16 weights into the A ring."""
        R: gl.constexpr = w_smem.shape[1]
        BLOCK_N: gl.constexpr = w_smem.shape[2]
        STAGES: gl.constexpr = w_smem.shape[0]
        A_STAGES: gl.constexpr = a_smem.shape[0]
        WL: gl.constexpr = _word_layout(R, BLOCK_N, gl.num_warps())
        for i in range(FIRST, n_iters, NCONV):
            stage = i % STAGES
            ai = i % A_STAGES
            mbarrier.wait(raw_ready.index(stage), (i // STAGES) & 1)
            w = w_smem.index(stage).load(WL)
            s2 = t_smem.index(2 * stage).load(WL)  # [1, BLOCK_N]: (s, s) of each column
            c2 = t_smem.index(2 * stage + 1).load(WL)  # ((C - z) s, ...)
            fence_async_shared()  # these reads before the TMA that refills the slot
            mbarrier.arrive(raw_empty.index(stage))
            if DIAG & 1:  # diagnostics: no conversion (the A tile gets the words' bits)
                a = gl.reshape(gl.permute(gl.reshape(gl.join(w, w), [R, BLOCK_N, 2]), (1, 0, 2)),
                               [BLOCK_N, 2 * R]).to(gl.bfloat16)
                a = gl.reshape(gl.join(a, a), [BLOCK_N, 4 * R])
                if W0 <= 4:
                    a = gl.reshape(gl.join(a, a), [BLOCK_N, 8 * R])
                if W0 == 2:
                    a = gl.reshape(gl.join(a, a), [BLOCK_N, 16 * R])
            else:
                a = _convert_words(w, s2, c2, W0)
            mbarrier.wait(a_empty.index(ai), ((i // A_STAGES) & 1) ^ 1)
            a_smem.index(ai).store(a)
            fence_async_shared()
            mbarrier.arrive(a_ready.index(ai))

    @gluon.jit(do_not_specialize=["M", "n_iters", "split_k"])
    def _quant_gemm_ws_kernel(x_desc, w_desc, t_desc, y_ptr, ws_ptr, lock_ptr, M, N, K, G, stride_ym,
                              k_per_split, n_iters, split_k, W0: gl.constexpr, STAGES: gl.constexpr,
                              A_STAGES: gl.constexpr, NCONV: gl.constexpr, CONV_REGS: gl.constexpr,
                              SPLIT: gl.constexpr, num_warps: gl.constexpr, DIAG: gl.constexpr = 0):
        """Tile ``[BLOCK_M, BLOCK_N]`` of y for one K split of ``k_per_split`` (= n_iters tiles of
        BLOCK_K); descriptors and SPLIT as in ``_quant_gemm_wg_kernel``. num_warps = 4 per 64
        weight rows (the wgmma partition); NCONV converter partitions of 4 warps with CONV_REGS
        registers per thread; one loader warp. DIAG (benchmarks only, wrong results): bit 0 skips the
        conversion, bit 1 the wgmma."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        R: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_m = gl.cdiv(M, BLOCK_M)
        off_m = (pid % num_m) * BLOCK_M
        off_n = (pid // num_m) * BLOCK_N
        A_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, R, BLOCK_N], w_desc.layout)
        t_smem = gl.allocate_shared_memory(gl.int32, [2 * STAGES, 1, BLOCK_N], t_desc.layout)
        a_smem = gl.allocate_shared_memory(gl.bfloat16, [A_STAGES, BLOCK_N, BLOCK_K], A_SL)
        raw_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        raw_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        a_ready = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
        a_empty = gl.allocate_shared_memory(gl.int64, [A_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(raw_ready.index(s), count=1)
            mbarrier.init(raw_empty.index(s), count=2)  # the tile's converter and its wgmma
        for s in gl.static_range(A_STAGES):
            mbarrier.init(a_ready.index(s), count=1)
            mbarrier.init(a_empty.index(s), count=1)
        k_start = pid_k * k_per_split
        # the tuples are written out in each call: a tuple kept in a variable loses its constexprs
        if NCONV == 2:
            gl.warp_specialize([
                (_ws_mma_partition, (x_smem, a_smem, raw_ready, raw_empty, a_ready, a_empty, y_ptr, ws_ptr,
                                     lock_ptr, M, N, stride_ym, n_iters, split_k, off_m, off_n, pid, pid_k,
                                     SPLIT, DIAG)),
                (_ws_load_partition, (x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, raw_ready, raw_empty, G,
                                      K, k_start, n_iters, off_m, off_n, W0)),
                (_ws_convert_partition, (w_smem, t_smem, a_smem, raw_ready, raw_empty, a_ready, a_empty,
                                         n_iters, 0, NCONV, W0, DIAG)),
                (_ws_convert_partition, (w_smem, t_smem, a_smem, raw_ready, raw_empty, a_ready, a_empty,
                                         n_iters, 1, NCONV, W0, DIAG))],
                [1, 4, 4], [LOAD_REGS, CONV_REGS, CONV_REGS])
        else:
            gl.warp_specialize([
                (_ws_mma_partition, (x_smem, a_smem, raw_ready, raw_empty, a_ready, a_empty, y_ptr, ws_ptr,
                                     lock_ptr, M, N, stride_ym, n_iters, split_k, off_m, off_n, pid, pid_k,
                                     SPLIT, DIAG)),
                (_ws_load_partition, (x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, raw_ready, raw_empty, G,
                                      K, k_start, n_iters, off_m, off_n, W0)),
                (_ws_convert_partition, (w_smem, t_smem, a_smem, raw_ready, raw_empty, a_ready, a_empty,
                                         n_iters, 0, NCONV, W0, DIAG))],
                [1, 4], [LOAD_REGS, CONV_REGS])


def ws_config(M: int, N: int, K: int, G: int, bits: int) -> dict:
    """The launcher's keywords for ``quant_gemm_ws``: BLOCK_M the power of two >= M in 8..64 (the
    wgmma's N side; larger M takes several row tiles), 64 weight rows per wgmma warpgroup; BLOCK_K
    128 at BLOCK_M <= 16 (halves the per-tile cost of barriers, waits and TMA issue per weight;
    shared memory allows 2 programs per SM), else 64; TMA ring 6 deep (4 at 8 bits: twice the word
    bytes), 3 A slots, one converter partition; 12 warps at 80 registers (2 programs per SM), 152
    for the converter at BLOCK_M <= 16, 128 above (the wgmma partition's accumulator grows)."""
    bm = max(8, min(64, triton.next_power_of_2(M)))
    bk = 128 if bm <= 16 and G % 128 == 0 and K % 128 == 0 else 64
    return dict(block_m=bm, block_n=64, block_k=bk, stages=4 if bits == 8 else 6, a_stages=3, nconv=1,
                max_regs=80, conv_regs=152 if bm <= 16 else 128)


def ws_split(M: int, N: int, K: int, bm: int, bn: int, bk: int, sms: int, per_sm: int = 2) -> int:
    """Split-K: the largest power of two that keeps all programs in one wave of ``per_sm`` per SM
    (tiles x split <= per_sm x SMs) and >= 8 K tiles per program."""
    tiles = -(-M // bm) * -(-N // bn)
    k_tiles = K // bk
    split = 1
    while (tiles * split * 2 <= per_sm * sms and k_tiles % (split * 2) == 0
           and k_tiles // (split * 2) >= 8):
        split *= 2
    return split


def ws_shared_bytes(bm: int, bn: int, bk: int, stages: int, a_stages: int, bits: int) -> int:
    """Shared memory of one program: per TMA slot the x tile, the words, two table rows and a
    barrier; the A ring and its two barriers per slot."""
    return stages * (bm * bk * 2 + bn * bk * bits // 8 + 2 * bn * 4 + 8) + a_stages * (bn * bk * 2 + 16)


def quant_gemm_ws(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_m: int | None = None,
                  block_n: int | None = None, block_k: int | None = None, stages: int | None = None,
                  a_stages: int | None = None, nconv: int | None = None, conv_regs: int | None = None,
                  max_regs: int | None = None, per_sm: int = 2, split_k: int | None = None,
                  diag: int = 0) -> torch.Tensor:
    """y ``[M, N]`` = x ``[M, K]`` (bf16, perm applied) @ dequant(W)^T on Hopper, M >= 1; the
    weights are rounded once to bf16. Keywords override ``ws_config`` (benchmarks); registers:
    ``max_regs`` x warps (rounded up to 4 x k) x 32 per program, of which the converter partitions
    take ``conv_regs`` per thread, the loader 24 and the wgmma partition the rest."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if not wg_applies(packed, max(M, 2), x):
        raise ValueError(f"quant_gemm_ws: needs Hopper, bf16 x and a uniform 2/4/8-bit weight with K, N, "
                         f"group multiples of 64 (got {x.dtype} x, {packed.fmt} {bits}-bit, N {N}, K {K}, "
                         f"G {G})")
    cfg = ws_config(M, N, K, G, bits)
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k, stages=stages, a_stages=a_stages,
                 nconv=nconv, conv_regs=conv_regs, max_regs=max_regs)
    cfg.update({k: v for k, v in given.items() if v is not None})
    BM, BN, BK = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    stages, a_stages, nconv = cfg["stages"], cfg["a_stages"], cfg["nconv"]
    warps = 4 * BN // 64
    if (BK % (32 // bits) or G % BK or K % BK or BN % 64 or nconv not in (1, 2) or a_stages < 2
            or stages < 2 or ws_shared_bytes(BM, BN, BK, stages, a_stages, bits) > 227 * 1024):
        raise ValueError(f"quant_gemm_ws: block_k {BK} must divide the group size {G} and K {K}, block_n "
                         f"{BN} a multiple of 64, nconv 1 or 2 (got {nconv}), a_stages and stages >= 2 (got "
                         f"{a_stages}, {stages}), shared memory <= 227 KB")
    per, split = k_split(K // BK, split_k or ws_split(M, N, K, BM, BN, BK, _num_sms(x.device), per_sm))
    tiles = -(-M // BM) * -(-N // BN)
    if split > 1:
        ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        locks = _lock_buffer(x.device, tiles)
    else:
        ws, locks = y, y
    table = scale_table(packed, True).view(2 * (K // G), N)
    words = packed.qweight
    P = 32 // bits
    flat = gl.NVMMASharedLayout(0, 32, rank=2)
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BM, BK],
                              gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))
    w_desc = TensorDescriptor(words, list(words.shape), [words.stride(0), 1], [BK // P, BN], flat)
    t_desc = TensorDescriptor(table, list(table.shape), [table.stride(0), 1], [1, BN], flat)
    _quant_gemm_ws_kernel[(tiles, split)](
        x_desc, w_desc, t_desc, y, ws, locks, M, N, K, G, y.stride(0), per * BK, per, split, bits, stages,
        a_stages, nconv, cfg["conv_regs"], split > 1, num_warps=warps, maxnreg=cfg["max_regs"], DIAG=diag)
    return y
