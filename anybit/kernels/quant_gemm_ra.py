"""Hopper wgmma GEMM whose weights are a *register* operand (Gluon): y = x @ dequant(W)^T, W4.

Why: the session-4 kernel (quant_gemm_wg.py) stores every converted weight tile into shared memory
for an SS wgmma, then fences and waits at a CTA barrier before the MMA can read it; that chain, not
the tensor core, sets its time from M 64 up (W4 4096x14336 M 256: 0.54x cuBLAS). wgmma can take its
A operand from registers (``DotOperandLayout(0, wgmma layout, k_width=2)``): the converted weights
go straight from the conversion into the MMA, with no store, fence or barrier.

``_quant_gemm_ra_kernel``: one program (one or two warpgroups, one or two m64 blocks each) =
``BLOCK_N`` weight rows (output columns) x ``BLOCK_M`` rows of x, one K split; swap-AB
(``y^T = W x^T``: x rows are the wgmma's N side, 16..256). Per K tile (BLOCK_K):

1. A TMA ring of STAGES slots, one mbarrier each (quant_gemm_wg._issue_tile): the x tile
   ``[BLOCK_M, BLOCK_K]``, the words ``[BLOCK_K / 8, 64]`` and the two scale-table rows of the
   tile's group, requested STAGES - 1 tiles ahead.
2. Register A layout: thread (lane l, warp w) holds rows ``16 w + l // 4`` and ``+ 8`` and, per k16
   step, K ``2 q, 2 q + 1, 2 q + 8, 2 q + 9`` (q = l % 4). In natural K order these are the codes
   2q, 2q + 1 of *every* word of its rows, so the four lanes of a quad read the same words (a
   shared-memory broadcast) and each takes its own byte: ``prmt`` puts byte q of the word and of
   the word >> 4 into the two halves, ``lop3 (t & 0x000F000F) | 0x43004300`` makes (128 + q_lo,
   128 + q_hi) in bf16, an exact ``fma`` makes ``q - 8``, a second ``fma`` with the column's
   ``(s, s)`` and ``((8 - z) s, ...)`` (quant_gemm_h2.scale_table) gives the weights, rounded once
   (the wg kernel's arithmetic, so both give the same bits). No permutation of x is needed: its
   tile is the wgmma's B operand straight from the TMA slot.
3. ``warpgroup_mma(A_i, x_i^T, async)``; while it runs, the slot of tile i - 1 is refilled (its MMA
   ended at the last wait) and tile i + 1 is converted; then ``warpgroup_mma_wait(0)`` with A_i
   and A_{i+1} as its dependencies, so A_{i+1} is computed before the wait while A_i is live.
   Register hazard (call s12-2): the wait's dependencies hold the bf16 values, not the packed
   32-bit registers that the HGMMA reads, so with one group left in flight across iterations
   (``wait(1)``) ptxas reused an in-flight A register for the next tile's table load and BLOCK_M
   256 summed wrong. With ``wait(0)`` each MMA ends within its iteration; where ptxas gives
   A_{i+1} the registers of A_i (BLOCK_M <= 64) it waits before converting (no overlap there).
   tests/quant/sm90_sass.py ``wgmma_register_a_hazards`` checks the compiled loop.

Split-K as in quant_gemm_wg (float32 partials, the tile's last program adds them in split order).

Testing: Gluon kernels do not run under ``TRITON_INTERPRET``. On CPU the tests check the PTX by
bit-level emulation and compile the kernel for sm_90 to check its loop (register-A wgmma kept in
flight, no shared-memory store of weights); on CUDA they compare with ``ref_quant_matmul``.
"""

from __future__ import annotations

import torch

from anybit.kernels.quant_gemm_h2 import _lock_buffer, scale_table
from anybit.kernels.quant_gemm_wg import wg_applies
from anybit.kernels.quant_gemv_h2 import _num_sms, k_split
from anybit.kernels.ra_slices import lane_operand, slices_asm
from anybit.quant.format import PackedWeight

try:  # Gluon (Triton >= 3.5) is optional: CPU installs and older Triton use the other paths
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from anybit.kernels.quant_gemm_wg import _issue_tile, _store_tile, _tile_cols
    from anybit.kernels.ra_slices import _quad_layout
except ImportError:  # pragma: no cover
    gluon = None

RA_BITS = (4,)  # widths of this path (the byte-per-quad-lane extraction is W4's: 2 codes per byte)


def _ra_asm(bits: int = 4) -> str:
    """PTX for one (word, quad lane) of a W4 tile (ra_slices.slices_asm(4), shared with quant_gemm_rws):
    inputs ``$2`` = the word (codes j at bits [4j, 4j + 4)), ``$3`` = the prmt selector of lane q
    (``_ra_selector``), ``$4`` = half2 (s, s), ``$5`` = half2 ((8 - z) s, ...) in bf16 bits; outputs ``$0,
    $1`` = the bf16 weights ``s (q_j - 8) + (8 - z) s`` of codes j = 2q and 2q + 1, each rounded once."""
    assert bits == 4, bits
    return slices_asm(4)


def _ra_selector(q: int) -> int:
    """prmt selector of quad lane q: result bytes 0, 1 <- byte q of the word, bytes 2, 3 <- byte q
    of the word >> 4 (ra_slices.lane_operand)."""
    return lane_operand(4, q)


if gluon is not None:
    _RA_ASM4: gl.constexpr = gl.constexpr(_ra_asm(4))

    @gluon.jit
    def _convert_pairs(w, sel, s2, c2, AL: gl.constexpr):
        """Words ``[R, BN]`` (layout SliceLayout(2, quad layout)), the selectors ``[1, 1, 4]`` and the
        columns' table rows ``[1, BN]`` -> the bf16 weights ``[BN, 8 R]`` (k = 8 r + 2 q + e) in the
        register-A layout AL."""
        w3, selb = gl.broadcast(gl.expand_dims(w, 2), sel)
        s3, _ = gl.broadcast(gl.expand_dims(s2, 2), w3)
        c3, _ = gl.broadcast(gl.expand_dims(c2, 2), w3)
        lo, hi = gl.inline_asm_elementwise(_RA_ASM4, "=h,=h,r,r,r,r", [w3, selb, s3, c3],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        v = gl.permute(gl.join(lo, hi), (1, 0, 2, 3))  # [BN, R, 4, 2]
        return gl.convert_layout(gl.reshape(v, [w.shape[1], w.shape[0] * 8]), AL)

    @gluon.jit
    def _load_convert(w_smem, t_smem, bars, i, sel, STAGES: gl.constexpr, WL: gl.constexpr, AL: gl.constexpr):
        """Wait for K tile i's ring slot, read its words and table rows, convert (``_convert_pairs``)."""
        stage = i % STAGES
        mbarrier.wait(bars.index(stage), (i // STAGES) & 1)
        w = w_smem.index(stage).load(WL)
        s2 = t_smem.index(2 * stage).load(WL)  # [1, BLOCK_N]: (s, s) of each column
        c2 = t_smem.index(2 * stage + 1).load(WL)  # ((8 - z) s, ...)
        return _convert_pairs(w, sel, s2, c2, AL)

    @gluon.jit(do_not_specialize=["M", "n_iters", "split_k"])
    def _quant_gemm_ra_kernel(x_desc, w_desc, t_desc, y_ptr, ws_ptr, lock_ptr, M, N, K, G, stride_ym,
                              k_per_split, n_iters, split_k, W0: gl.constexpr, STAGES: gl.constexpr,
                              SPLIT: gl.constexpr, SUM_LOADS: gl.constexpr, num_warps: gl.constexpr):
        """Tile ``[BLOCK_M, BLOCK_N]`` of y for one K split of ``k_per_split`` (= n_iters tiles of
        BLOCK_K). Descriptors: x ``[M, K]`` bf16 (block [BLOCK_M, BLOCK_K]; rows >= M read as 0),
        the int32 words ``[K / 8, N]`` (block [BLOCK_K / 8, BLOCK_N]) and the int32 half2 table
        ``[2 K / G, N]`` (block [1, BLOCK_N]); y ``[M, N]`` (row stride stride_ym). SPLIT: float32
        partials in ws summed by the tile's last program (SUM_LOADS loads in flight)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        R: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
        gl.static_assert((num_warps == 4 or num_warps == 8) and W0 == 4, "one or two warpgroups; W4")
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_m = gl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        QL: gl.constexpr = _quad_layout(R, BLOCK_N, num_warps)
        WL: gl.constexpr = gl.SliceLayout(2, QL)
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        AL: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, R, BLOCK_N], w_desc.layout)
        t_smem = gl.allocate_shared_memory(gl.int32, [2 * STAGES, 1, BLOCK_N], t_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, QL)))
        sel = gl.expand_dims(gl.expand_dims(q * 0x11 + (q + 4) * 0x1100, 0), 0)  # _ra_selector
        k_start = pid_k * k_per_split
        KG = K // G
        for s in gl.static_range(STAGES):  # prologue: tiles 0 .. STAGES - 1 fill the ring
            _issue_tile(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, bars, s, k_start + s * BLOCK_K,
                        off_m, off_n, G, KG, s < n_iters, 8)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        a = _load_convert(w_smem, t_smem, bars, 0, sel, STAGES, WL, AL)
        for i in range(n_iters - 1):
            stage = i % STAGES
            acc = warpgroup_mma(a, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            # while it runs: refill the slot of tile i - 1 (its MMA ended at the last wait; with two
            # warpgroups, the barrier waits for the other's too), then convert tile i + 1 into
            # registers other than a's: both are dependencies of the wait that ends this MMA, so
            # a_next is computed before it (not sunk below it) while a is still live
            if num_warps == 8:
                gl.thread_barrier()
            nxt = i - 1 + STAGES
            _issue_tile(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, bars, nxt % STAGES,
                        k_start + nxt * BLOCK_K, off_m, off_n, G, KG, (i >= 1) & (nxt < n_iters), 8)
            a_next = _load_convert(w_smem, t_smem, bars, i + 1, sel, STAGES, WL, AL)
            acc, a, a_next = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, a_next))
            a = a_next
        acc = warpgroup_mma(a, x_smem.index((n_iters - 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        cols = _tile_cols(acc, off_n)
        _store_tile(acc, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, split_k, off_m, cols, pid, pid_k, SPLIT,
                    SUM_LOADS)


def ra_applies(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether this kernel can run the call: quant_gemm_wg's conditions (Hopper, bf16 x, uniform
    single slice, N / K / group multiples of 64, TMA alignment) and a width in RA_BITS."""
    return packed.bits in RA_BITS and wg_applies(packed, M, x)


def ra_shared_bytes(bm: int, bn: int, bk: int, stages: int) -> int:
    """Shared memory of one program: per stage the x tile, the W4 words and two table rows."""
    return stages * (bm * bk * 2 + bn * bk // 2 + 2 * bn * 4 + 8)


def ra_split(M: int, N: int, K: int, bm: int, bn: int, bk: int, warps: int, sms: int) -> int:
    """Split-K: doubled while the programs still fit one wave (1 program per SM on 8 warps, 2 on 4)
    and each split keeps >= 8 K tiles; none at BLOCK_M 256 (the sum of a 64 x 256 float32 tile per
    warpgroup spills registers; offline sm_90 SASS)."""
    tiles = -(-M // bm) * -(-N // bn)
    wave = sms * (1 if warps == 8 else 2)
    k_tiles, split = K // bk, 1
    while bm < 256 and tiles * split * 2 <= wave and k_tiles % (split * 2) == 0:
        if k_tiles // (split * 2) < 8:
            break
        split *= 2
    return split


def ra_config(M: int, N: int, K: int, G: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). BLOCK_M: the power of two >= M in 16..256 (x rows:
    the wgmma's N side), 128 instead of 256 when 256 would leave half the SMs idle (no split-K
    there). Up to BLOCK_M 128: one warpgroup, BLOCK_N 64, 4 stages, 2-3 programs per SM (their
    conversions overlap each other's MMA); at 256: two warpgroups sharing the x tile, BLOCK_N 128 (x
    is re-read from L2 for every BLOCK_N weight rows). From the H100 sweep of s12-4
    (quant_matmul_ra_s12, 4096x14336): M 64 36.6 us against 42.2 on two warpgroups, M 256 75.9 against
    83.0, M 1024 187.6 against 225.9 on one. BLOCK_K 64."""
    bm = max(16, min(256, triton.next_power_of_2(M)))
    programs_256 = -(-M // 256) * -(-N // 128)
    if bm == 256 and 2 * programs_256 <= sms:
        bm = 128
    bn, warps = (128, 8) if bm == 256 else (64, 4)
    return bm, bn, 64, 4, warps


def quant_gemm_ra(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_m: int | None = None,
                  block_n: int | None = None, block_k: int | None = None, stages: int | None = None,
                  num_warps: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """y ``[M, N]`` = x ``[M, K]`` (bf16, contiguous, perm applied) @ dequant(W)^T on Hopper, W4; the
    weights are rounded once to bf16 (the same bits as quant_gemm_wg). Keywords override
    ``ra_config`` / ``ra_split`` (benchmarks)."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if not ra_applies(packed, M, x):
        widths = "/".join(map(str, RA_BITS))
        raise ValueError(f"quant_gemm_ra: needs Hopper, bf16 x and a uniform {widths}-bit weight with K, N, "
                         f"group multiples of 64 (got {x.dtype} x, {packed.fmt} {bits}-bit, N {N}, K {K}, "
                         f"G {G})")
    sms = _num_sms(x.device)
    bm, bn, bk, st, wp = ra_config(M, N, K, G, sms)
    BM, BN, BK = block_m or bm, block_n or bn, block_k or bk
    warps = num_warps or wp
    if stages is None:  # the most (<= 6) that fit with the requested blocks
        stages = max(2, next((n for n in range(6, 1, -1) if ra_shared_bytes(BM, BN, BK, n) <= 227 * 1024), 2))
    smem = ra_shared_bytes(BM, BN, BK, stages)
    if BK % 64 or G % BK or K % BK or BM not in (16, 32, 64, 128, 256) or warps not in (4, 8) \
            or BN not in (16 * warps, 32 * warps) or stages < 2 or smem > 227 * 1024:
        raise ValueError(f"quant_gemm_ra: block_k {BK} must be a multiple of 64 dividing the group size "
                         f"{G} and K {K}, block_m {BM} a power of two in 16..256, num_warps 4 or 8 (got "
                         f"{warps}), block_n 16 or 32 x num_warps (got {BN}), stages >= 2 (got {stages}), "
                         f"shared memory <= 227 KB (got {smem} bytes)")
    per, split = k_split(K // BK, split_k or ra_split(M, N, K, BM, BN, BK, warps, sms))
    tiles = -(-M // BM) * -(-N // BN)
    if split > 1:
        ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        locks = _lock_buffer(x.device, tiles)
    else:
        ws, locks = y, y
    table = scale_table(packed, True).view(2 * (K // G), N)
    acc_regs = BM * BN // (32 * warps)  # the split-K sum keeps sum_loads tiles in flight: no spills
    sum_loads = 4 if acc_regs < 64 else 1
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BM, BK],
                              gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))
    w_desc = TensorDescriptor(packed.qweight, [K // 8, N], [packed.qweight.stride(0), 1],
                              [BK // 8, BN], gl.NVMMASharedLayout(0, 32, rank=2))
    t_desc = TensorDescriptor(table, [2 * (K // G), N], [N, 1], [1, BN],
                              gl.NVMMASharedLayout(0, 32, rank=2))
    _quant_gemm_ra_kernel[(tiles, split)](
        x_desc, w_desc, t_desc, y, ws, locks, M, N, K, G, y.stride(0), per * BK, per, split, bits, stages,
        split > 1, sum_loads, num_warps=warps)
    return y
