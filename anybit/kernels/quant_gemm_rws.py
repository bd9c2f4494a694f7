"""Warp-specialized register-A wgmma GEMM (Gluon): y = x @ dequant(W)^T, uniform 1..8 bits, for M >= 17.

Widths other than 4 (session 21): the loader brings each slice's words (anybit.quant.format) and the
consumers convert them in registers with ra_slices.convert_slices; W4 is quant_gemm_ra's conversion.

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
  ``arrive(empty[i % STAGES])``; no CTA barrier.

Nothing makes the two warpgroups alternate, but nothing holds them together either: once one is
behind, its conversion runs while the other's MMA occupies the tensor cores, as in a ping-pong
schedule (s20-1: 1235 cycles per K tile at BLOCK_M 256, 4096x14336 M 1024 at 0.97x cuBLAS). PING (opt-in)
makes them alternate explicitly: each consumer issues its K tile's MMAs only after the other has issued its
own (``_take_turn``).

Epilogue (session 31): at BLOCK_M 256 a whole tile's 64 x 256 accumulator per consumer went out as 128
two-byte stores per thread (each thread's values lie along M, y's rows), and cost ~20% of the kernel at M
1024. EPI writes it to a shared ``[BLOCK_M, 64]`` buffer per consumer and stores it with one TMA copy,
waited for only before the consumer's next whole tile (s31-3 / s31-4: 4096x14336 M 1024 0.78-0.80x ->
1.00-1.01x cuBLAS, 14336x4096 M 256 0.91 -> 1.13x).

Stream-K: one program per SM (the ring takes ~222 KB of shared memory), and program p of P takes the
tile-steps [p T / P, (p + 1) T / P) of the T = tiles x K tiles (tiles numbered M-block fastest). With
one program per tile, s20-1 lost up to a whole wave: 448 tiles = 3.4 waves on 132 SMs (14336x4096
M 1024, 0.79x), 32 tiles on 132 SMs (4096x14336 M 256). A program's range is cut into pieces, one
per output tile it meets (``_segment``); the loader and both consumers walk the same pieces, the
ring running on across them. A whole tile is stored to y; a piece is stored as float32 into the
program's slot (2 p where its range starts, 2 p + 1 where it ends) and the tile's last piece to
arrive adds all pieces in program order (fixed order: the same bits every call) and writes y.

Session 32 (docs/notes_quant.md): where no tile has more than two pieces the second adds the first's
piece to its accumulator in registers and writes the tile like a whole one (DUO). The work can start
with waves of whole tiles, every program on the same K tile (``base`` tile-steps; ``rws_dp_waves``),
stream-K taking the rest; with few tiles, or with a program count whose waves leave one equal part per
program, the launcher splits tiles into equal parts (``rws_even_split``, ``rws_parts_after_waves``).
Stream-K steps ran 15-25% slower than whole-tile steps (s32-2), so the launcher keeps ranges long and
cut at tile halves or quarters.

Session 33: the kernel is a programmatic dependent launch (the loader requests the words of the first ring
tiles before ``griddepcontrol.wait``, x and the tables after it; s33-2: -1.4 to -2.1 us per call at M 32-64
and on 6144x4096 M 256). Where every stream-K range is one half tile, DUO's roles are fixed (``rws_swap``):
each program of a tile stores one consumer's piece and adds the other's, instead of one storing both (s33-3:
6144x4096 M 256 29.0 -> 27.6 us). 128-wide K tiles (``block_k=128``) are opt-in: 1-3% faster at M 64 as plain
launches (s33-1), 1-5% slower with PDL (s33-2), 11-19% slower at M >= 256.

Testing as quant_gemm_ra: Gluon does not run under ``TRITON_INTERPRET``; the CPU tests compile the
kernel for sm_90 offline (register-A HGMMA, no spills, no hazard); the GPU tests compare with
``ref_quant_matmul`` and with quant_gemm_ra.
"""

from __future__ import annotations

import functools
import os

import torch

from anybit.kernels.pdl import pdl_enabled
from anybit.kernels.quant_gemm_h2 import _lock_buffer, scale_table
from anybit.kernels.quant_gemm_ra import gluon
from anybit.kernels.quant_gemm_wg import wg_applies
from anybit.kernels.quant_gemv_h2 import _num_sms
from anybit.kernels.ra_slices import RS_BITS
from anybit.quant.format import SLICES, PackedWeight

HALF_N = 64  # weight rows per consumer warpgroup (one m64 block)
# Whole tiles leave through shared memory and a TMA store (the kernel's EPI) at these BLOCK_M, where y allows
# it (bf16, 16-byte aligned rows). Interleaved H100 A/B (quant_matmul_rws_epi_s31_3 / _s31_4, W4, us, EPI /
# before): BLOCK_M 256 14336x4096 M 256 46.0 / 57.4 and 46.8 / 57.7, M 1024 181.8 / 217.3 and 185.0 / 223.6;
# 4096x14336 M 1024 158.0 / 200.6 and 162.6 / 207.6; 6144x4096 M 1024 87.0 / 100.0 and 87.9 / 100.9; lm_head
# M 256 380.2 / 490.1, M 1024 1637.7 / 1910.8. At BLOCK_M 128 it was level or 2-6% slower (M 128 on every
# shape, M 256 on 4096x14336 and 6144x4096), and it costs the ring two of its six stages at 256. Env
# ANYBIT_RWS_EPI=0/1: never / always.
RWS_EPI_BM = (256,)
RWS_EPI = os.environ.get("ANYBIT_RWS_EPI", "auto")
# The consumers take turns issuing their MMAs (the kernel's PING, ``_take_turn``) at these BLOCK_M: none by
# default. Without EPI it made BLOCK_M 256 faster (s31-2, us, PING / not: 4096x14336 M 1024 178.6 / 200.9,
# 14336x4096 M 256 54.8 / 57.8) and BLOCK_M 64-128 slower (M 64 on every shape +2-5%, M 256 on 4096x14336 and
# 6144x4096 +6-8%); with EPI it was level or slower everywhere (s31-3 / s31-4: 14336x4096 M 1024 192.3 /
# 181.8 and 190.1 / 185.0). Env ANYBIT_RWS_PING=0/1: never / always.
RWS_PING_BM = ()
RWS_PING = os.environ.get("ANYBIT_RWS_PING", "auto")
# Stream-K tiles in two pieces: the second to finish adds the first's piece to its accumulator in registers
# and writes the tile like a whole one (the kernel's DUO), instead of both storing float32 pieces and the last
# reloading both; where no tile has more than two pieces (``rws_max_pieces``). Interleaved H100 A/B
# (quant_matmul_rws_duo_s32_1, M 1024, us, DUO / not): W4 14336x4096 189.2 / 188.8, 6144x4096 85.8 / 88.5;
# W2 178.9 / 186.2 and 82.0 / 88.9. Env ANYBIT_RWS_DUO=0: never.
RWS_DUO = os.environ.get("ANYBIT_RWS_DUO", "1")
# Whole waves of tiles before the stream-K part (``rws_dp_waves``): all but one ("keep1"), so the stream-K
# part spans one to two waves. Interleaved H100 A/B (quant_matmul_rws_dp_s32_3, W4 M 1024, us, waves: time):
# 14336x4096 (448 tiles, 3.4 waves) 0: 180.7, 2: 173.4, 3: 183.6; 6144x4096 (192) 0: 82.6, 1: 85.0; lm_head
# (4008) 0: 1684.0, 29: 1603.7, 30: 1601.3. Short stream-K ranges (25-29 tile-steps after every whole wave)
# lost more in their pieces than the whole waves gained. Env ANYBIT_RWS_DP=0 / all / keep1.
RWS_DP = os.environ.get("ANYBIT_RWS_DP", "keep1")
# At most half a wave of tiles: each split into equal parts, one program per part (``rws_even_split``),
# instead of stream-K over every SM. Env ANYBIT_RWS_EVEN=0: never.
RWS_EVEN = os.environ.get("ANYBIT_RWS_EVEN", "1") != "0"


def rws_choice(env: str, bm: int, rule: tuple[int, ...], forced: bool | None) -> bool:
    """A kernel option: ``forced`` if given, else the env setting ("0" / "1"), else whether BLOCK_M ``bm``
    is in ``rule``."""
    if forced is not None:
        return bool(forced)
    return env == "1" if env in ("0", "1") else bm in rule


def tma_store_fits(y: torch.Tensor) -> bool:
    """Whether y ``[M, N]`` can be a TMA store's destination: bf16, unit column stride, 16-byte aligned base
    and rows."""
    return (y.dtype == torch.bfloat16 and y.stride(1) == 1 and y.data_ptr() % 16 == 0
            and (y.stride(0) * 2) % 16 == 0)

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from anybit.kernels.quant_gemv_mma import _gdc_launch_dependents, _gdc_wait
    from anybit.kernels.ra_slices import _quad_layout, _width, convert_slices

    LOAD_REGS: gl.constexpr = gl.constexpr(24)  # the loader warp: scalar TMA coordinates only
    # the partial-tile sum: x rows per pass ([64, 64] float32: 32 registers per load) and pieces loaded at
    # once (s20-2: one [32, 64] load at a time, 8 x pieces round trips, cost ~15-25 us per kernel)
    FIX_ROWS: gl.constexpr = gl.constexpr(64)
    FIX_PIECES: gl.constexpr = gl.constexpr(4)

    @gluon.jit
    def _program_range(total, base):
        """This program's local tile-steps [0, L): first its ``base / P`` data-parallel ones (whole tiles p, p
        + P, p + 2 P, ..., every program on the same K tile at the same time), then its stream-K range [base
        + p rem / P, base + (p + 1) rem / P) of the rem = total - base left (base 0: stream-K only; P =
        tiles: whole tiles)."""
        p = gl.program_id(0)
        P = gl.num_programs(0)
        rem = total - base
        return 0, base // P + (p + 1) * rem // P - p * rem // P

    @gluon.jit
    def _segment(cur, end, k_tiles, total, base):
        """The piece of this program's local range [cur, end) (``_program_range``) that lies in one output
        tile: (tile, first K tile, number of K tiles)."""
        p = gl.program_id(0)
        P = gl.num_programs(0)
        dp = base // P
        g = base + p * (total - base) // P + cur - dp  # the global tile-step, in the stream-K part
        tile = g // k_tiles
        k_lo = g - tile * k_tiles
        n = gl.minimum(k_tiles - k_lo, end - cur)
        in_dp = cur < dp
        return (gl.where(in_dp, (cur // k_tiles) * P + p, tile), gl.where(in_dp, 0, k_lo),
                gl.where(in_dp, k_tiles, n))

    @gluon.jit
    def _rws_issue(x_desc, w_desc, w1_desc, w2_desc, t_desc, x_smem, w_smem, w1_smem, w2_smem, t_smem, bar,
                   stage, off_m, off_n, k0, KG, G, off1, off2, NC: gl.constexpr, NS: gl.constexpr,
                   WORDS: gl.constexpr, REST: gl.constexpr):
        """The TMA copies of one ring tile into slot ``stage`` on ``bar``: WORDS the words of every slice of
        each 64-row half, REST the x tile and the table rows."""
        HN: gl.constexpr = w_desc.block_type.shape[1]
        R0: gl.constexpr = w_desc.block_type.shape[0]
        R1: gl.constexpr = w1_desc.block_type.shape[0]
        R2: gl.constexpr = w2_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        kb = k0 // BLOCK_K
        g = k0 // G
        if REST:
            tma.async_copy_global_to_shared(x_desc, [off_m, k0], bar, x_smem.index(stage))
        for c in gl.static_range(NC):
            n0 = off_n + c * HN
            j = NC * stage + c
            if WORDS:
                tma.async_copy_global_to_shared(w_desc, [kb * R0, n0], bar, w_smem.index(j))
                if NS > 1:
                    tma.async_copy_global_to_shared(w1_desc, [off1 + kb * R1, n0], bar, w1_smem.index(j))
                if NS > 2:
                    tma.async_copy_global_to_shared(w2_desc, [off2 + kb * R2, n0], bar, w2_smem.index(j))
            if REST:
                tma.async_copy_global_to_shared(t_desc, [g, n0], bar, t_smem.index(2 * j))
                tma.async_copy_global_to_shared(t_desc, [KG + g, n0], bar, t_smem.index(2 * j + 1))

    @gluon.jit
    def _rws_load_partition(x_desc, w_desc, w1_desc, w2_desc, t_desc, x_smem, w_smem, w1_smem, w2_smem,
                            t_smem, ready, empty, G, K, k_tiles, total, base, num_m, off1, off2,
                            NC: gl.constexpr, NS: gl.constexpr, PDL: gl.constexpr):
        """One warp: every K tile of this program's range, in order, into slot it % STAGES (x tile; per
        half c the words of slice 0 into w_smem[NC stage + c] (slices 1, 2 into w1_smem / w2_smem from
        qweight rows off1 / off2 on), the table rows into t_smem[2 (NC stage + c)] and [... + 1]) once
        every consumer released the slot's previous tile. PDL: the words of the first STAGES tiles are
        requested before ``griddepcontrol.wait`` (weights are never written by a kernel; x, which the
        previous kernel may write, and the tables, which a captured graph may compute just before, after
        it)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        STAGES: gl.constexpr = x_smem.shape[0]
        HN: gl.constexpr = w_desc.block_type.shape[1]
        nbytes: gl.constexpr = (x_desc.block_type.nbytes + NC * w_desc.block_type.nbytes
                                + (NC * w1_desc.block_type.nbytes if NS > 1 else 0)
                                + (NC * w2_desc.block_type.nbytes if NS > 2 else 0)
                                + 2 * NC * t_desc.block_type.nbytes)
        KG = K // G
        if PDL:  # the first pass over the ring: expect the whole tile, request its words
            cur, end = _program_range(total, base)
            it = 0
            while (cur < end) & (it < STAGES):
                tile, k_lo, n = _segment(cur, end, k_tiles, total, base)
                n = gl.minimum(n, STAGES - it)
                for j in range(n):
                    bar = ready.index(it)
                    mbarrier.expect(bar, nbytes)
                    _rws_issue(x_desc, w_desc, w1_desc, w2_desc, t_desc, x_smem, w_smem, w1_smem, w2_smem,
                               t_smem, bar, it, (tile % num_m) * BLOCK_M, (tile // num_m) * (NC * HN),
                               (k_lo + j) * BLOCK_K, KG, G, off1, off2, NC, NS, True, False)
                    it += 1
                cur += n
            _gdc_launch_dependents()
            _gdc_wait()
        cur, end = _program_range(total, base)
        it = 0
        while cur < end:
            tile, k_lo, n = _segment(cur, end, k_tiles, total, base)
            off_m = (tile % num_m) * BLOCK_M
            off_n = (tile // num_m) * (NC * HN)
            for j in range(n):
                stage = it % STAGES
                bar = ready.index(stage)
                k0 = (k_lo + j) * BLOCK_K
                if PDL and it < STAGES:  # expected and its words requested before the wait
                    _rws_issue(x_desc, w_desc, w1_desc, w2_desc, t_desc, x_smem, w_smem, w1_smem, w2_smem,
                               t_smem, bar, stage, off_m, off_n, k0, KG, G, off1, off2, NC, NS, False, True)
                else:
                    mbarrier.wait(empty.index(stage), ((it // STAGES) & 1) ^ 1)
                    mbarrier.expect(bar, nbytes)
                    _rws_issue(x_desc, w_desc, w1_desc, w2_desc, t_desc, x_smem, w_smem, w1_smem, w2_smem,
                               t_smem, bar, stage, off_m, off_n, k0, KG, G, off1, off2, NC, NS, True, True)
                it += 1
            cur += n

    @gluon.jit
    def _rws_convert(w_smem, w1_smem, w2_smem, t_smem, bars, it, C: gl.constexpr, NC: gl.constexpr,
                     BITS: gl.constexpr, AL: gl.constexpr):
        """Wait for ring tile ``it``, read half C's words (every slice) and table rows, convert
        (ra_slices.convert_slices)."""
        STAGES: gl.constexpr = bars.shape[0]
        HN: gl.constexpr = w_smem.shape[2]
        stage = it % STAGES
        mbarrier.wait(bars.index(stage), (it // STAGES) & 1)
        j = NC * stage + C
        w0 = w_smem.index(j).load(gl.SliceLayout(2, _quad_layout(w_smem.shape[1], HN, 4)))
        w1 = w0
        w2 = w0
        if _width(BITS, 1):
            w1 = w1_smem.index(j).load(gl.SliceLayout(2, _quad_layout(w1_smem.shape[1], HN, 4)))
        if _width(BITS, 2):
            w2 = w2_smem.index(j).load(gl.SliceLayout(2, _quad_layout(w2_smem.shape[1], HN, 4)))
        TL: gl.constexpr = gl.SliceLayout(2, _quad_layout(1, HN, 4))
        s2 = t_smem.index(2 * j).load(TL)  # [1, 64]: (s, s) of each column
        c2 = t_smem.index(2 * j + 1).load(TL)  # ((C - z) s, ...)
        return convert_slices(w0, w1, w2, s2, c2, BITS, AL)

    @gluon.jit(noinline=True)
    def _rws_fixup(y_ptr, ws_ptr, M, N, stride_ym, off_m, off_n, tile, first, last, k_tiles, total, base, P,
                   BLOCK_M: gl.constexpr, HN: gl.constexpr, C: gl.constexpr, NC: gl.constexpr):
        """Sum half C of tile ``tile``'s pieces (programs first..last, in order) into y. Not inlined: its
        offsets, hoisted out of the consumer's K loop, made that loop spill at BLOCK_M 256."""
        FL: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
        FR: gl.constexpr = FIX_ROWS if FIX_ROWS < BLOCK_M else BLOCK_M  # within the tile (s20-8, BLOCK_M 32)
        fm = gl.arange(0, FR, layout=gl.SliceLayout(1, FL))
        fn = gl.arange(0, HN, layout=gl.SliceLayout(0, FL))
        for r0 in gl.static_range(0, BLOCK_M, FR):
            tot = gl.zeros([FR, HN], gl.float32, FL)
            rows = (C * BLOCK_M + r0 + fm[:, None]) * HN + fn[None, :]
            for q0 in range(first, last + 1, FIX_PIECES):  # loads in flight at once, added in order
                for u in gl.static_range(FIX_PIECES):
                    q = q0 + u
                    q_slot = _piece_slot(q, tile, k_tiles, total, base, P)
                    tot += gl.load(ws_ptr + q_slot * (NC * BLOCK_M * HN) + rows, mask=q <= last, other=0.0,
                                   cache_modifier=".cg")
            ym = off_m + r0 + fm
            yn = off_n + C * HN + fn
            gl.store(y_ptr + ym[:, None] * stride_ym + yn[None, :], tot.to(y_ptr.dtype.element_ty),
                     mask=(ym < M)[:, None] & (yn < N)[None, :])

    @gluon.jit
    def _rws_tile_out(acc, y_ptr, y_desc, y_smem, M, N, stride_ym, off_m, off_n, C: gl.constexpr,
                      EPI: gl.constexpr):
        """Half C of a finished output tile (``acc [64, BLOCK_M]``: rows = output columns ``off_n + 64 C +
        r``) to y. EPI: through this consumer's ``y_smem [BLOCK_M, 64]`` and a TMA store (``y_desc``), left in
        flight until the consumer's next tile, instead of 2-byte stores from the MMA layout (each thread's
        values lie along M, y's rows)."""
        if EPI:
            tma.store_wait(0)  # the previous tile's store has read y_smem (issued by one thread)
            gl.thread_barrier()
            y_smem.store(gl.permute(acc.to(y_smem.dtype), (1, 0)))
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(y_desc, [off_m, off_n + C * acc.shape[0]], y_smem)
        else:
            MMA: gl.constexpr = acc.type.layout
            on = off_n + C * acc.shape[0] + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, MMA))
            om = off_m + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, MMA))
            omask = (on < N)[:, None] & (om < M)[None, :]
            gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=omask)

    @gluon.jit
    def _acc_flat(acc):
        """The wgmma accumulator ``[64, BM]`` as ``[64 BM]`` in register order (no data movement): thread t =
        32 w + 4 r + q holds rows 16 w + 8 i + r and columns 8 j + 2 q + e, at flat index (2 j + i) 256 + 2 t
        + e, so a warp's stores and loads of it are 256 contiguous bytes (8 per thread)."""
        BM: gl.constexpr = acc.shape[1]
        x = gl.permute(gl.reshape(acc, [4, 2, 8, BM // 8, 4, 2]), (3, 1, 0, 2, 4, 5))  # (j, i, w, r, q, e)
        return gl.reshape(x, [acc.shape[0] * BM])

    @gluon.jit
    def _acc_unflat(flat, HN: gl.constexpr, BM: gl.constexpr, MMA: gl.constexpr):
        """``_acc_flat``'s inverse: ``[HN, BM]`` in layout MMA."""
        x = gl.permute(gl.reshape(flat, [BM // 8, 2, 4, 8, 4, 2]), (2, 1, 3, 0, 4, 5))  # (w, i, r, j, q, e)
        return gl.convert_layout(gl.reshape(x, [HN, BM]), MMA)

    @gluon.jit
    def _piece_slot(q, tile, k_tiles, total, base, P):
        """Program q's ws slot for its piece of ``tile``: 2 q where q's range starts (inside the tile),
        2 q + 1 where it ends."""
        return 2 * q + ((base + q * (total - base) // P) // k_tiles != tile).to(gl.int32)

    @gluon.jit
    def _rws_store(acc, y_ptr, ws_ptr, lock_ptr, y_desc, y_smem, M, N, stride_ym, off_m, off_n, tile, k_lo, n,
                   k_tiles, total, base, C: gl.constexpr, NC: gl.constexpr, EPI: gl.constexpr,
                   DUO: gl.constexpr):
        """Half C of output tile ``tile`` (``acc [64, BLOCK_M]``: rows = output columns ``off_n + 64 C +
        r``), K tiles [k_lo, k_lo + n). A whole tile goes to y (``_rws_tile_out``). A piece: the tile's
        pieces come from programs first..last, counted on ``lock[NC tile + C]`` (reset by the last).

        - DUO (every tile in at most two pieces): the first to arrive stores its piece to its slot in ws
          in register order (``_acc_flat``) and flags it (+4 on the counter); the second waits for the
          flag, adds that piece to its own in registers and writes the tile like a whole one. a + b = b +
          a in float32, so the bits do not depend on which program arrives first. DUO 2 (the launcher's
          ``rws_swap``: every piece is its program's whole stream-K range, so both end together): the roles
          are fixed instead, program first owning the even consumers' halves and last the odd ones, so each
          program stores one half and loads one rather than one program storing both and the other loading
          both.
        - Otherwise every piece goes to its slot (``_piece_slot``; ``[2 P, NC, BLOCK_M, 64]`` float32) and
          the last to arrive adds them in program order (the same bits every call) and writes y."""
        MMA: gl.constexpr = acc.type.layout
        HN: gl.constexpr = acc.shape[0]
        BLOCK_M: gl.constexpr = acc.shape[1]
        if (k_lo == 0) & (n == k_tiles):
            _rws_tile_out(acc, y_ptr, y_desc, y_smem, M, N, stride_ym, off_m, off_n, C, EPI)
        else:
            p = gl.program_id(0)
            P = gl.num_programs(0)
            rem = total - base  # programs whose stream-K ranges meet this tile:
            first = ((tile * k_tiles - base + 1) * P - 1) // rem
            last = (((tile + 1) * k_tiles - base) * P - 1) // rem
            lock = lock_ptr + NC * tile + C
            if DUO:
                flat = _acc_flat(acc)
                offs = gl.arange(0, HN * BLOCK_M, layout=flat.type.layout)
                if DUO == 2:  # fixed roles: half C belongs to program first for even C, last for odd C
                    if C % 2 == 0:
                        seen = (p != first).to(gl.int32)
                    else:
                        seen = (p != last).to(gl.int32)
                else:
                    seen = gl.atomic_add(lock, 1, sem="acq_rel")
                if seen == 0:  # first (DUO 2: the giver): leave the piece, then flag it
                    mine = _piece_slot(p, tile, k_tiles, total, base, P)
                    gl.store(ws_ptr + (mine * NC + C) * (BLOCK_M * HN) + offs, flat)
                    gl.thread_barrier()
                    gl.atomic_add(lock, 4, sem="release")
                else:
                    seen = gl.atomic_add(lock, 0, sem="acquire")
                    while seen < 4:  # the first has not yet flagged its piece
                        seen = gl.atomic_add(lock, 0, sem="acquire")
                    other = first + last - p
                    flat += gl.load(ws_ptr + (_piece_slot(other, tile, k_tiles, total, base, P) * NC + C)
                                    * (BLOCK_M * HN) + offs, cache_modifier=".cg")
                    _rws_tile_out(_acc_unflat(flat, HN, BLOCK_M, MMA), y_ptr, y_desc, y_smem, M, N, stride_ym,
                                  off_m, off_n, C, EPI)
                    gl.atomic_xchg(lock, 0)  # counters stay zeroed between calls
            else:
                ml = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
                nl = gl.arange(0, HN, layout=gl.SliceLayout(1, MMA))
                slot = _piece_slot(p, tile, k_tiles, total, base, P)
                gl.store(ws_ptr + ((slot * NC + C) * BLOCK_M + ml[None, :]) * HN + nl[:, None], acc)
                gl.thread_barrier()
                count = gl.atomic_add(lock, 1, sem="acq_rel")
                if count == last - first:
                    _rws_fixup(y_ptr, ws_ptr, M, N, stride_ym, off_m, off_n, tile, first, last, k_tiles,
                               total, base, P, BLOCK_M, HN, C, NC)
                    gl.atomic_xchg(lock, 0)  # counters stay zeroed between calls

    @gluon.jit
    def _take_turn(turn, idx, C: gl.constexpr, PING: gl.constexpr):
        """PING: before issuing its MMA of ring tile ``idx``, consumer C waits until the previous consumer
        (C - 1, or the last one for C 0) has issued its own (consumer 0's first wait passes at once). The
        tensor cores then take the consumers' K tiles one after another, so each consumer's wait(0),
        slot release and next issue fall inside another consumer's MMA instead of every consumer finishing
        together and leaving the pipe idle (s20-10: tensor pipe 64% busy at M 1024, 17% of samples on
        ``WARPGROUP.DEPBAR``)."""
        if PING:
            mbarrier.wait(turn.index(C), (idx & 1) ^ (1 if C == 0 else 0))

    @gluon.jit
    def _pass_turn(turn, C: gl.constexpr, NC: gl.constexpr, PING: gl.constexpr):
        """PING: after issuing its MMA, consumer C lets the next one (C + 1 mod NC) issue."""
        if PING:
            mbarrier.arrive(turn.index((C + 1) % NC))

    @gluon.jit
    def _rws_mma_partition(x_smem, w_smem, w1_smem, w2_smem, t_smem, ready, empty, turn, y_ptr, ws_ptr,
                           lock_ptr, y_desc, y_smem, M, N, stride_ym, k_tiles, total, base, num_m,
                           C: gl.constexpr, NC: gl.constexpr, BITS: gl.constexpr, PING: gl.constexpr,
                           EPI: gl.constexpr, DUO: gl.constexpr):
        """Consumer warpgroup C: weight rows ``64 C + [0, 64)`` of each output tile in this program's
        range, piece by piece (``_segment``), each piece stored by ``_rws_store``. PING: the consumers
        issue their MMAs of each K tile in turn (``_take_turn``)."""
        BLOCK_M: gl.constexpr = x_smem.shape[1]
        STAGES: gl.constexpr = x_smem.shape[0]
        HN: gl.constexpr = w_smem.shape[2]
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        AL: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        cur, end = _program_range(total, base)
        it = 0
        while cur < end:
            tile, k_lo, n = _segment(cur, end, k_tiles, total, base)
            acc = gl.zeros([HN, BLOCK_M], gl.float32, MMA)
            a = _rws_convert(w_smem, w1_smem, w2_smem, t_smem, ready, it, C, NC, BITS, AL)
            for j in range(n - 1):
                _take_turn(turn, it + j, C, PING)
                acc = warpgroup_mma(a, x_smem.index((it + j) % STAGES).permute((1, 0)), acc, is_async=True)
                _pass_turn(turn, C, NC, PING)
                a_next = _rws_convert(w_smem, w1_smem, w2_smem, t_smem, ready, it + j + 1, C, NC, BITS, AL)
                acc, a, a_next = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, a_next))
                mbarrier.arrive(empty.index((it + j) % STAGES))  # x, words and table of that tile: read
                a = a_next
            _take_turn(turn, it + n - 1, C, PING)
            acc = warpgroup_mma(a, x_smem.index((it + n - 1) % STAGES).permute((1, 0)), acc, is_async=True)
            _pass_turn(turn, C, NC, PING)
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
            mbarrier.arrive(empty.index((it + n - 1) % STAGES))
            it += n
            _rws_store(acc, y_ptr, ws_ptr, lock_ptr, y_desc, y_smem.index(C), M, N, stride_ym,
                       (tile % num_m) * BLOCK_M, (tile // num_m) * (NC * HN), tile, k_lo, n, k_tiles, total,
                       base, C, NC, EPI, DUO)
            cur += n
        if EPI:
            tma.store_wait(0)

    @gluon.jit(do_not_specialize=["M", "total", "base"])
    def _quant_gemm_rws_kernel(x_desc, w_desc, w1_desc, w2_desc, t_desc, y_desc, y_ptr, ws_ptr, lock_ptr,
                               M, N, K, G, stride_ym, total, base, off1, off2, BITS: gl.constexpr,
                               STAGES: gl.constexpr, NC: gl.constexpr, CONS_REGS: gl.constexpr,
                               num_warps: gl.constexpr, PING: gl.constexpr = False,
                               EPI: gl.constexpr = False, DUO: gl.constexpr = 0,
                               PDL: gl.constexpr = False):
        """``total`` = tiles x K tiles tile-steps (tiles ``[BLOCK_M, 64 NC]`` of y, numbered M-block fastest):
        the first ``base`` (base / (P K tiles) waves of whole tiles) data-parallel, tile w P + p of wave w to
        program p, the rest stream-K, program p of P taking [base + p rem / P, base + (p + 1) rem / P) of the
        rem = total - base (``_program_range``). Descriptors: x ``[M,
        K]`` bf16 (block [BLOCK_M, BLOCK_K]; rows >= M read as 0); qweight ``[BITS K / 32, N]`` int32 once
        per slice (anybit.quant.format: slice i of width w_i, block [BLOCK_K w_i / 32, 64], its rows from
        0 / off1 / off2; w1_desc / w2_desc are w_desc where the width has fewer slices); the int32 half2
        table ``[2 K / G, N]`` (block [1, 64]); y ``[M, N]`` (row stride stride_ym); ws ``[2 P, NC,
        BLOCK_M, 64]`` float32 pieces; lock ``NC tiles`` int32 counters, zero. NC consumer warpgroups (2
        or 4) of 64 weight rows: num_warps 4 (the default partition is consumer 0), the others run with
        CONS_REGS registers per thread, the loader with 24. EPI: whole tiles leave through ``y_desc`` (y,
        block [BLOCK_M, 64], bf16) from a shared buffer per consumer; PING: ``_take_turn``; DUO (every tile in
        at most two pieces; 1: by arrival, 2: fixed roles): the second piece of a tile adds the first in
        registers (``_rws_store``); PDL: a programmatic dependent launch (anybit/kernels/pdl.py; the loader's
        wait, ``_rws_load_partition``)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        HN: gl.constexpr = w_desc.block_type.shape[1]
        NS: gl.constexpr = 1 + (_width(BITS, 1) > 0) + (_width(BITS, 2) > 0)
        gl.static_assert(num_warps == 4 and HN == 64, "one warpgroup per 64 rows")
        gl.static_assert(w_desc.block_type.shape[0] * 32 == BLOCK_K * _width(BITS, 0), "slice 0's block")
        gl.static_assert(NC == 2 or NC == 4, "two or four consumers")
        k_tiles = K // BLOCK_K
        num_m = gl.cdiv(M, BLOCK_M)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(gl.int32, [NC * STAGES] + w_desc.block_type.shape, w_desc.layout)
        w1_smem = w_smem
        w2_smem = w_smem
        if NS > 1:
            w1_smem = gl.allocate_shared_memory(gl.int32, [NC * STAGES] + w1_desc.block_type.shape,
                                                w1_desc.layout)
        if NS > 2:
            w2_smem = gl.allocate_shared_memory(gl.int32, [NC * STAGES] + w2_desc.block_type.shape,
                                                w2_desc.layout)
        t_smem = gl.allocate_shared_memory(gl.int32, [2 * NC * STAGES, 1, HN], t_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=NC)  # every consumer
        if EPI:  # one whole-tile staging buffer per consumer
            y_smem = gl.allocate_shared_memory(gl.bfloat16, [NC] + y_desc.block_type.shape, y_desc.layout)
        else:  # unused; w_smem has >= NC entries, so every consumer's index C stays in range
            y_smem = w_smem
        turn = gl.allocate_shared_memory(gl.int64, [NC, 1], mbarrier.MBarrierLayout())
        for c in gl.static_range(NC):
            mbarrier.init(turn.index(c), count=1)
        # the tuples are written out: a tuple kept in a variable loses its constexprs (quant_gemm_ws)
        if NC == 2:
            gl.warp_specialize([
                (_rws_mma_partition, (x_smem, w_smem, w1_smem, w2_smem, t_smem, ready, empty, turn, y_ptr,
                                      ws_ptr, lock_ptr, y_desc, y_smem, M, N, stride_ym, k_tiles, total, base,
                                      num_m, 0, NC, BITS, PING, EPI, DUO)),
                (_rws_mma_partition, (x_smem, w_smem, w1_smem, w2_smem, t_smem, ready, empty, turn, y_ptr,
                                      ws_ptr, lock_ptr, y_desc, y_smem, M, N, stride_ym, k_tiles, total, base,
                                      num_m, 1, NC, BITS, PING, EPI, DUO)),
                (_rws_load_partition, (x_desc, w_desc, w1_desc, w2_desc, t_desc, x_smem, w_smem, w1_smem,
                                       w2_smem, t_smem, ready, empty, G, K, k_tiles, total, base, num_m, off1,
                                       off2, NC, NS, PDL))],
                [4, 1], [CONS_REGS, LOAD_REGS])
        else:
            gl.warp_specialize([
                (_rws_mma_partition, (x_smem, w_smem, w1_smem, w2_smem, t_smem, ready, empty, turn, y_ptr,
                                      ws_ptr, lock_ptr, y_desc, y_smem, M, N, stride_ym, k_tiles, total, base,
                                      num_m, 0, NC, BITS, PING, EPI, DUO)),
                (_rws_mma_partition, (x_smem, w_smem, w1_smem, w2_smem, t_smem, ready, empty, turn, y_ptr,
                                      ws_ptr, lock_ptr, y_desc, y_smem, M, N, stride_ym, k_tiles, total, base,
                                      num_m, 1, NC, BITS, PING, EPI, DUO)),
                (_rws_mma_partition, (x_smem, w_smem, w1_smem, w2_smem, t_smem, ready, empty, turn, y_ptr,
                                      ws_ptr, lock_ptr, y_desc, y_smem, M, N, stride_ym, k_tiles, total, base,
                                      num_m, 2, NC, BITS, PING, EPI, DUO)),
                (_rws_mma_partition, (x_smem, w_smem, w1_smem, w2_smem, t_smem, ready, empty, turn, y_ptr,
                                      ws_ptr, lock_ptr, y_desc, y_smem, M, N, stride_ym, k_tiles, total, base,
                                      num_m, 3, NC, BITS, PING, EPI, DUO)),
                (_rws_load_partition, (x_desc, w_desc, w1_desc, w2_desc, t_desc, x_smem, w_smem, w1_smem,
                                       w2_smem, t_smem, ready, empty, G, K, k_tiles, total, base, num_m, off1,
                                       off2, NC, NS, PDL))],
                [4, 4, 4, 1], [CONS_REGS, CONS_REGS, CONS_REGS, LOAD_REGS])


def rws_shared_bytes(bm: int, bk: int, stages: int, nc: int = 2, bits: int = 4, epi: bool = False) -> int:
    """Shared memory of one program: per stage the x tile, nc 64-row blocks of words (every slice), two
    table rows per block and two barriers; a turn barrier per consumer; with ``epi`` a bf16 ``[bm, 64]``
    staging buffer per consumer."""
    ring = stages * (bm * bk * 2 + nc * HALF_N * bk * bits // 8 + 2 * nc * HALF_N * 4 + 16)
    return ring + 8 * nc + (nc * bm * HALF_N * 2 if epi else 0)


def rws_stages(bm: int, bk: int, nc: int = 2, bits: int = 4, epi: bool = False) -> int:
    """The deepest ring (<= 6 stages, s20-13: deeper gained nothing) that fits 227 KB (2 if none does)."""
    return next((n for n in range(6, 1, -1) if rws_shared_bytes(bm, bk, n, nc, bits, epi) <= 227 * 1024), 2)


def rws_even_split(M: int, N: int, bm: int, sms: int, nc: int = 2) -> bool:
    """Whether to split each tile at BLOCK_M ``bm`` into the same number of equal parts, one program per
    part (RWS_EVEN): at most half a wave of tiles, and at BLOCK_M < 256 the parts fill >= 7/8 of the SMs.
    H100 s32-5 (quant_matmul_rws_even_s32_5, us, equal parts / stream-K over 132): 4096x14336 and 4096x4096
    (32 tiles, quarters on 128 SMs) M 64 28.8 / 30.8 and 13.5 / 15.6, M 128 35.7 / 39.2 and 17.5 / 20.7;
    6144x4096 (48 tiles, halves on 96 SMs) M 64 18.9 / 17.8, M 128 24.2 / 22.7, but at BLOCK_M 256 (M 256)
    30.4 / 32.7."""
    tiles = -(-M // bm) * (N // (nc * HALF_N))
    return RWS_EVEN and 2 * tiles <= sms and (bm >= 256 or 8 * tiles * (sms // tiles) >= 7 * sms)


def rws_config(M: int, N: int = 0, sms: int = 132, bits: int = 4) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, stages, consumer registers). BLOCK_M: 64 up to M 64, 128 up to 128; above, 256
    when its tiles (N / 128 per row block) keep 3/4 of the SMs busy, or are few enough for equal parts
    (``rws_even_split``) and 256 pads M no more than 128 does; else 128. BLOCK_K 64, the most stages (<= 6)
    that fit, 240 registers for the worker consumer (the default one gets what the launch's maxnreg leaves:
    also 240; at 232 / 248 the worker's K loop spilled 3 registers at BLOCK_M 256, offline sm_90 SASS).
    Fitted to the interleaved H100 A/Bs of s20-4 (quant_matmul_rws_ab_s20_4, x cuBLAS): 14336x4096 M 256
    (112 tiles) 0.92 at 256 against 0.81; and s32-4 (quant_matmul_rws_tiles_s32_4, M 256, us): 4096x14336 (32
    tiles at 256) 52.7 at 256 in quarters against 60.6 at 128 over 132 programs, 6144x4096 (48) 30.2 at 256
    in halves against 32.6. Per K tile a program takes ~740 / 950 / 1235 cycles at 64 / 128 / 256 (s20-1)."""
    bm = 64 if M <= 64 else 128 if M <= 128 else 256
    few = N and 3 * sms > 4 * (-(-M // 256) * (N // (2 * HALF_N)))  # < 3/4 of a wave at 256
    if bm == 256 and few and not (rws_even_split(M, N, 256, sms) and -(-M // 256) * 2 == -(-M // 128)):
        bm = 128
    return bm, 64, rws_stages(bm, 64, 2, bits), 240


def rws_programs(M: int, N: int, K: int, bm: int, bk: int, sms: int, nc: int = 2) -> int:
    """Programs: one per tile (whole tiles, no pieces) when the tiles fill one wave to at least 3/4; with at
    most half a wave of tiles (``rws_even_split``), each tile in the same number of equal parts (>= 4 K
    tiles each); else stream-K over one program per SM (fewer when that would leave < 4 K tiles each).
    Interleaved H100 A/B of s20-4, x cuBLAS, whole / stream-K: one wave 85-97% full 14336x4096 M 64 1.67 /
    1.57, M 256 0.92 / 0.78, 4096x14336 M 1024 0.82 / 0.75; few tiles 4096x14336 M 64 (32) 0.60 / 1.66,
    6144x4096 M 64 (48) 0.83 / 1.28; more than one wave 14336x4096 M 1024 (448) 0.71 / 0.76, 6144x4096 M 1024
    (192) 0.65 / 0.76. Equal parts against stream-K over 132 (s32-4, M 256, us): 4096x14336 at 256 52.7 /
    60.6 (quarters), at 128 58.5 / 60.6 (halves); 6144x4096 at 256 30.2 / 34.8 (halves)."""
    tiles = -(-M // bm) * (N // (nc * HALF_N))
    if 3 * sms <= 4 * tiles <= 4 * sms:
        return tiles
    if rws_even_split(M, N, bm, sms, nc):
        return tiles * max(1, min(sms // tiles, K // bk // 4))
    for P in range(sms, (7 * sms + 7) // 8 - 1, -1):  # whole waves, then one equal part per program
        parts = rws_parts_after_waves(tiles, P)
        if parts and K // bk >= 4 * parts:
            return P
    return max(1, min(sms, tiles * (K // bk) // 4))


@functools.lru_cache(maxsize=256)
def rws_max_pieces(tiles: int, k_tiles: int, programs: int, base: int = 0) -> int:
    """The most pieces of any stream-K tile (programs first..last of the kernel's formulas) when ``programs``
    split the tile-steps after the first ``base``. Ranges of >= k_tiles steps give at most two; shorter ones
    may too (e.g. 2 P = tiles: halves)."""
    total = tiles * k_tiles
    rem, P = total - base, programs
    if rem <= 0:
        return 1
    return max((((t + 1) * k_tiles - base) * P - 1) // rem - ((t * k_tiles - base + 1) * P - 1) // rem + 1
               for t in range(base // k_tiles, tiles))


# DUO with fixed roles (``rws_swap``, the kernel's DUO 2). Env ANYBIT_RWS_SWAP=0: never.
RWS_SWAP = os.environ.get("ANYBIT_RWS_SWAP", "1") != "0"


def rws_swap(tiles: int, k_tiles: int, programs: int, base: int, sms: int) -> bool:
    """Whether two-piece tiles may swap halves with fixed roles (RWS_SWAP): every program's stream-K range is
    one half of a tile (so both programs of a tile reach its pieces together, at the end of their ranges), and
    every program is resident at once (<= one per SM: an owner spins until its giver has stored)."""
    rem = tiles * k_tiles - base
    return (RWS_SWAP and programs <= sms and rem > 0 and rem % programs == 0
            and 2 * (rem // programs) == k_tiles)


def rws_parts_after_waves(tiles: int, programs: int) -> int:
    """How many equal parts each tile left after the whole waves splits into when those parts give every
    program one (tiles % programs divides programs at least twice), else 0."""
    left = tiles % programs
    return programs // left if RWS_EVEN and tiles > programs and left and programs % left == 0 and \
        programs // left >= 2 else 0


def rws_dp_waves(tiles: int, programs: int) -> int:
    """Waves of whole tiles run data-parallel before the stream-K part: every whole wave where the tiles left
    split into one equal part per program (``rws_parts_after_waves``), else by RWS_DP: "0" none, "all" every
    whole wave, "keep1" all but one, which stream-K takes with the remainder."""
    full = tiles // programs
    if rws_parts_after_waves(tiles, programs) or RWS_DP == "all":
        return full
    return full - 1 if RWS_DP == "keep1" and full > 1 else 0


def rws_applies(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether this kernel can run the call: quant_gemm_wg's conditions (Hopper, bf16 x, uniform, N / K /
    group multiples of 64, TMA alignment) for any width in RS_BITS (1..8 bits)."""
    return wg_applies(packed, M, x, RS_BITS)


def quant_gemm_rws(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_m: int | None = None,
                   stages: int | None = None, programs: int | None = None, consumers: int = 2,
                   cons_regs: int | None = None, max_regs: int | None = None,
                   ping: bool | None = None, epi: bool | None = None,
                   duo: bool | None = None, dp_waves: int | None = None,
                   block_k: int | None = None, pdl: bool | None = None,
                   swap: bool | None = None) -> torch.Tensor:
    """y ``[M, N]`` = x ``[M, K]`` (bf16, contiguous, perm applied) @ dequant(W)^T on Hopper, uniform 1..8
    bits, N a multiple of 64 x consumers; at W4 the same weights (bf16, rounded once) as quant_gemm_ra.
    Keywords override ``rws_config`` / ``rws_programs`` (benchmarks). ``consumers``: 2 or 4 warpgroups of
    64 weight rows sharing the x tile; 4 needs BLOCK_M 64 (registers). ``max_regs``: the launch's register
    cap per thread, by default what fills the register file with one program per SM (12 warps x 168; 20
    warps x 96 with four consumers, which then get 112 each). ``ping``: the consumers issue their MMAs in
    turn (the kernel's PING; None: ``rws_choice`` with RWS_PING / RWS_PING_BM); ``epi``: whole tiles leave
    through a TMA store (the kernel's EPI; None: RWS_EPI / RWS_EPI_BM; never where y does not allow it);
    ``duo``: where every tile has at most two pieces, the second adds the first in registers (the kernel's
    DUO; None: RWS_DUO); ``dp_waves``: waves of whole tiles (every program on the same K tile) before the
    stream-K part (None: ``rws_dp_waves``); ``block_k``: K per ring tile, 64 or 128 (a multiple of it must be
    the group size; None: ``rws_config``); ``pdl``: launched as a programmatic dependent launch, the words of
    the first ring tiles requested before the wait (None: where anybit/kernels/pdl.py enables it); ``swap``:
    DUO with fixed roles, each program of a two-piece tile storing one consumer's half and adding the other's
    (the kernel's DUO 2; None: ``rws_swap``; ignored without DUO)."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    nc = consumers
    pdl = pdl_enabled(x.device, pdl)
    if not rws_applies(packed, M, x) or nc not in (2, 4) or N % (nc * HALF_N):
        raise ValueError(f"quant_gemm_rws: needs Hopper, bf16 x and a uniform 1..8-bit weight with N a "
                         f"multiple of 64 x consumers (2 or 4) and K, group multiples of 64 (got {x.dtype} "
                         f"x, {packed.fmt} {bits}-bit, N {N}, K {K}, G {G}, consumers {nc})")
    sms = _num_sms(x.device)
    bm, bk, _, regs = rws_config(M, N, sms, bits)
    BM, BK = block_m or bm, block_k or bk
    ping = rws_choice(RWS_PING, BM, RWS_PING_BM, ping)
    epi = rws_choice(RWS_EPI, BM, RWS_EPI_BM, epi) and tma_store_fits(y)
    stages = stages or rws_stages(BM, BK, nc, bits, epi)
    smem = rws_shared_bytes(BM, BK, stages, nc, bits, epi)
    if (BM not in (16, 32, 64, 128, 256) or BK not in (64, 128) or stages < 2 or smem > 227 * 1024 or G % BK
            or K % BK or (nc == 4 and BM > 64)):
        raise ValueError(f"quant_gemm_rws: block_m {BM} must be a power of two in 16..256 (<= 64 with four "
                         f"consumers), block_k 64 or 128 (got {BK}), stages >= 2 (got {stages}), shared "
                         f"memory <= 227 KB (got {smem} bytes), K {K} and the group size {G} "
                         f"multiples of block_k")
    if max_regs is None:
        max_regs = 168 if nc == 2 else 96
    if cons_regs is None:
        cons_regs = regs if nc == 2 else 112
    tiles, k_tiles = -(-M // BM) * (N // (nc * HALF_N)), K // BK
    total = tiles * k_tiles
    P = min(programs or rws_programs(M, N, K, BM, BK, sms, nc), total)  # P = tiles: whole
    waves = rws_dp_waves(tiles, P) if dp_waves is None else dp_waves
    if not 0 <= waves * P <= tiles:
        raise ValueError(f"quant_gemm_rws: dp_waves {waves} x {P} programs must be 0..{tiles} tiles")
    base = waves * P * k_tiles  # the data-parallel tile-steps; the stream-K part: the rem after them
    most = rws_max_pieces(tiles, k_tiles, P, base)  # 1: every tile whole (cached: the call's hot path)
    pieces = most > 1
    duo = most == 2 and (RWS_DUO != "0" if duo is None else duo)
    swap = duo and rws_swap(tiles, k_tiles, P, base, sms) if swap is None else duo and swap
    ws = torch.empty(2 * P * nc * BM * HALF_N if pieces else 1, dtype=torch.float32, device=x.device)
    locks = _lock_buffer(x.device, nc * tiles)
    table = scale_table(packed, True).view(2 * (K // G), N)
    flat = gl.NVMMASharedLayout(0, 32, rank=2)
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BM, BK],
                              gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))
    q = packed.qweight
    w_descs = [TensorDescriptor(q, [bits * K // 32, N], [q.stride(0), 1], [BK * w // 32, HALF_N], flat)
               for w in SLICES[bits]]
    offs = [K * sum(SLICES[bits][:i]) // 32 for i in (1, 2)]  # first qweight row of slices 1 and 2
    w_descs += w_descs[:1] * (3 - len(w_descs))
    t_desc = TensorDescriptor(table, [2 * (K // G), N], [N, 1], [1, HALF_N], flat)
    y_layout = gl.NVMMASharedLayout.get_default_for([BM, HALF_N], gl.bfloat16)
    y_desc = TensorDescriptor(y, [M, N], [y.stride(0), 1], [BM, HALF_N], y_layout) if epi else x_desc
    _quant_gemm_rws_kernel[(P,)](
        x_desc, *w_descs, t_desc, y_desc, y, ws, locks, M, N, K, G, y.stride(0), total, base, *offs, bits,
        stages, nc, cons_regs, num_warps=4, maxnreg=max_regs, PING=ping, EPI=epi, DUO=2 if swap else int(duo),
        PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    return y
