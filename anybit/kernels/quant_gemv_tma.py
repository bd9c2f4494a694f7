"""The mma.sync GEMV/GEMM of quant_gemv_mma.py (M = 1..16) with the weight words streamed through a
TMA ring in shared memory (Gluon, sm_90): y = x @ dequant(W)^T for single-slice 1/2/4-bit weights.

Why: quant_gemv_mma loads each program's words straight into registers two tiles ahead. Its
programs are short (W4 M = 1 on 4096x14336: 512 programs of 7 K tiles, split-K 2) and at M = 16
only 3 fit per SM (162 registers), so few bytes are in flight: 1.9 TB/s at M = 1 and 1.2 TB/s at
M = 16 on the H100 (quant_matmul_s11), against 2.8 TB/s for the attention kernel that streams its
KV pages through a TMA ring (attention_decode_gl.py).

Here one thread of the program requests the words of tile ``i + STAGES - 1`` (a ``[KS R, CW]`` box
of the ``[K / P, N]`` int32 words: R word rows of each of the KS K chunks, CW = 128 / KS output
columns) while the warps work on tile i, so ``STAGES - 1`` tiles (8 KB each for W4 with BLOCK_K
128) are in flight per program whatever the registers. The warps read a tile from shared memory in
a layout (``_smem_words_layout``) that becomes quant_gemv_mma's register layout by relabelling only,
so the rest (exact ``q - z`` unpacking, one MMA chain per tile, group scales in float32, the K
split inside the program, the split-K and accumulating epilogues, PDL) is quant_gemv_mma's. Scales
and zero points stay global loads two tiles ahead (a few registers each). The x tile rides in the
same ring slot (``X_TMA``, one more TMA copy, requested after the PDL wait) where the program has one
K chunk per tile (KS 1, M >= 2); at KS > 1 it is a global load in the iteration.

Testing as the other Gluon kernels: no ``TRITON_INTERPRET``; the CPU tests compile it for sm_90
offline (TMA loads, HMMA, no spills), the GPU tests compare with ``ref_quant_matmul``.
"""

from __future__ import annotations

import os

import torch

from anybit.kernels.pdl import pdl_enabled
from anybit.kernels.quant_gemm_wg import gluon
from anybit.kernels.quant_gemv_h2 import _num_sms, k_split
from anybit.kernels.quant_gemv_mma import (
    check_acc,
    ks_fits,
    mma_applies,
    mma_config,
    mma_rows,
    not_applicable,
    split_k_buffers,
)
from anybit.quant.format import SLICES, PackedWeight

TMA_BITS = (1, 2, 4)  # single-slice widths (several slices would need one ring per slice)
TMA_STAGES = 3  # ring slots: 2 tiles in flight per program (4 and 6 were level or slower, H100 s15-1)
# Resident programs per SM by BLOCK_M (registers from the offline sm_90 compile, 4 warps; shared
# memory TMA_STAGES x 8 KB for W4 BLOCK_K 128): they size the split-K as in quant_gemv_mma.
TMA_PROGRAMS_PER_SM = {8: 4, 16: 4}
# Register cap (Triton ``maxnreg``): 4 programs of 4 warps per SM. Offline sm_90 with the cap, no
# spills: W4 93 (BLOCK_M 8, KS 8) / 126 (BLOCK_M 16); W1 112 / 127; uncapped BLOCK_M 16 took 131.
TMA_MAX_REGISTERS = 128
# The x tiles through the ring as well (the kernel's X_TMA, at KS 1, i.e. M >= 2): env ANYBIT_TMA_X=0
# turns it off. H100 s16-3, W4 (us, without -> with): M 16 24.4 -> 23.6 (14336x4096), 124.2 -> 120.2
# (lm_head), 26.6 -> 26.2 (4096x14336); M 8 19.9 -> 19.0, 19.2 -> 18.8; M 4 level.
TMA_X = os.environ.get("ANYBIT_TMA_X", "1") == "1"

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from anybit.kernels.quant_gemm_wg import _store_tile
    from anybit.kernels.quant_gemv_mma import (
        _gdc_launch_dependents,
        _gdc_wait,
        _ks_offsets,
        _ks_sum,
        _mma_layout,
        _relabel_x,
        _tile_col,
        _unpack_tile,
        _words_layout,
        _x_layout,
        _x_tile_ptrs,
    )

    @gluon.constexpr_function
    def _smem_words_layout(R, KS):
        """Register layout of a ring slot ``[KS R, CW]`` (row kr R + r, column c) whose relabelling
        ``[KS, R, CW] -> [R, KS, CW] -> [R, 128]`` (column kr CW + c) is ``_words_layout(R, 128)``:
        that layout's bases (registers: columns 1, 2, then rows 4, 8, ..; lanes: rows 1, 2, columns
        4, 8, 16; warps: columns 32, 64) with column 2^b >= CW moved to row (2^b / CW) R."""
        R, KS = int(R), int(KS)
        CW = 128 // KS

        def at(r, t):
            return [r + (t // CW) * R, t % CW] if t >= CW else [r, t]

        regs = [at(0, 1), at(0, 2)] + [at(1 << i, 0) for i in range(2, R.bit_length() - 1)]
        lanes = [at(1, 0), at(2, 0), at(0, 4), at(0, 8), at(0, 16)]
        warps = [at(0, 32), at(0, 64)]
        return gl.DistributedLinearLayout(regs, lanes, warps, [], [KS * R, CW])

    @gluon.jit
    def _issue_words(w_desc, w_smem, bars, j, row0, off_n, pred, x_bytes: gl.constexpr = 0):
        """TMA of tile j (its first word row row0 + j KS R) into ring slot j % STAGES; the slot's
        barrier also expects ``x_bytes`` from ``_issue_x``."""
        ROWS: gl.constexpr = w_desc.block_type.shape[0]
        slot = j % w_smem.shape[0]
        bar = bars.index(slot)
        NBYTES: gl.constexpr = w_desc.block_type.nbytes + x_bytes
        mbarrier.expect(bar, NBYTES, pred=pred)
        tma.async_copy_global_to_shared(w_desc, [row0 + j * ROWS, off_n], bar, w_smem.index(slot), pred=pred)

    @gluon.constexpr_function
    def _x_tile_bytes(block_m, block_k, x_tma):
        """Bytes of one x tile in the ring (0 without X_TMA)."""
        return int(block_m) * int(block_k) * 2 if x_tma else 0

    @gluon.jit
    def _issue_x(x_desc, x_smem, bars, j, k_start, pred):
        """TMA of tile j's x rows ``[BLOCK_M, BLOCK_K]`` at K k_start + j BLOCK_K (rows >= M arrive as
        zeros) into ring slot j % STAGES, on the barrier that ``_issue_words`` armed for both."""
        BK: gl.constexpr = x_desc.block_type.shape[1]
        slot = j % x_smem.shape[0]
        tma.async_copy_global_to_shared(x_desc, [0, k_start + j * BK], bars.index(slot), x_smem.index(slot),
                                        pred=pred)

    @gluon.jit
    def _load_sz(s_ptr, z_ptr, N, G, k0, z_off, s_off):
        """The group scales (MMA rows, offsets s_off) and zero points (word columns, z_off) of the
        K tile at k0."""
        g = k0 // G
        return gl.load(z_ptr + g * N + z_off), gl.load(s_ptr + g * N + s_off)

    @gluon.jit
    def _load_x(x_ptrs, x_mask, k0):
        """The x^T tile at k0 as loaded (``_x_layout``); ``_x_operand`` relabels it."""
        return gl.load(x_ptrs + k0, mask=x_mask, other=0.0)

    @gluon.jit(do_not_specialize=["M", "n_iters", "split_k"])
    def _quant_gemv_tma_kernel(x_ptr, w_desc, s_ptr, z_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G, stride_xm,
                               stride_ym, k_per_split, n_iters, split_k, W0: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,
                               PDL: gl.constexpr, STAGES: gl.constexpr = 4, ACC: gl.constexpr = False,
                               KS: gl.constexpr = 1, MR: gl.constexpr = 0, x_desc=None,
                               X_TMA: gl.constexpr = False):
        """quant_gemv_mma's ``_quant_gemv_mma_kernel`` (same arguments, one slice, no cluster, no DIAG)
        with the words from ``w_desc``: the int32 words ``[K / P, N]``, block ``[KS BLOCK_K / P, 128 /
        KS]``. Grid (N KS / 128, split). X_TMA (KS 1): the x tiles ride in the same ring slots from
        ``x_desc`` (x ``[M, K]``, block ``[BLOCK_M, BLOCK_K]``), requested after the PDL wait, instead
        of global loads in the iteration that uses them (an L2 round trip per tile, s16-1)."""
        P: gl.constexpr = 32 // W0
        R: gl.constexpr = BLOCK_K // P
        CW: gl.constexpr = 128 // KS
        SK: gl.constexpr = KS * BLOCK_K  # K per iteration
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        off_n = pid * CW
        MMA: gl.constexpr = _mma_layout(1)
        AL: gl.constexpr = gl.DotOperandLayout(0, MMA, 8)
        BL: gl.constexpr = gl.DotOperandLayout(1, MMA, 8)
        WL: gl.constexpr = _words_layout(R, 128)
        SWL: gl.constexpr = _smem_words_layout(R, KS)
        XL: gl.constexpr = _x_layout(BLOCK_K, BLOCK_M, W0)
        k_start = pid_k * k_per_split
        row0 = k_start // P

        X_BYTES: gl.constexpr = _x_tile_bytes(BLOCK_M, BLOCK_K, X_TMA)
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, KS * R, CW], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        for j in gl.static_range(STAGES - 1):  # the weights do not depend on the previous kernel
            _issue_words(w_desc, w_smem, bars, j, row0, off_n, n_iters > j, X_BYTES)
        x_ptrs, x_mask = _x_tile_ptrs(x_ptr, stride_xm, M, XL, BLOCK_K, BLOCK_M, KS, MR)
        t = gl.arange(0, 128, layout=gl.SliceLayout(0, WL))
        _, z_off = _ks_offsets(t, off_n, N, G, KS, BLOCK_K, P)
        _, s_off = _ks_offsets(_tile_col(gl.arange(0, 128, layout=gl.SliceLayout(1, MMA))), off_n, N, G, KS,
                               BLOCK_K, P)
        k1 = k_start + gl.minimum(1, n_iters - 1) * SK
        z, s = _load_sz(s_ptr, z_ptr, N, G, k_start, z_off, s_off)
        z1, s1 = _load_sz(s_ptr, z_ptr, N, G, k1, z_off, s_off)
        if PDL:
            _gdc_launch_dependents()
            _gdc_wait()
        if X_TMA:  # x may be the previous kernel's output: requested after the wait
            x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
            for j in gl.static_range(STAGES - 1):
                _issue_x(x_desc, x_smem, bars, j, k_start, n_iters > j)
        acc = gl.zeros([128, BLOCK_M], gl.float32, MMA)
        for i in range(n_iters):
            slot = i % STAGES
            k2 = k_start + gl.minimum(i + 2, n_iters - 1) * SK  # past the end: reload the last tile
            z2, s2 = _load_sz(s_ptr, z_ptr, N, G, k2, z_off, s_off)
            if not X_TMA:
                xt = _load_x(x_ptrs, x_mask, k_start + i * SK)  # L2; needed only after the words' unpacking
            mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
            w = w_smem.index(slot).load(SWL)
            if X_TMA:
                xt = x_smem.index(slot).permute((1, 0)).load(XL)
            # refill the slot of tile i - 1: the compiler's fence.proxy.async + bar.sync before the TMA
            # (every warp has read it: the reads are before this point in program order)
            ahead = i + STAGES - 1
            _issue_words(w_desc, w_smem, bars, ahead, row0, off_n, ahead < n_iters, X_BYTES)
            if X_TMA:
                _issue_x(x_desc, x_smem, bars, ahead, k_start, ahead < n_iters)
            w = gl.reshape(gl.permute(gl.reshape(w, [KS, R, CW]), (1, 0, 2)), [R, 128])
            w = gl.convert_layout(w, WL)  # the same layout: a relabelling
            xb = gl.convert_layout(gl.permute(_relabel_x(gl.permute(xt, (1, 0)), W0), (1, 0)), BL)
            part = mma_v2(_unpack_tile(w, z, AL, W0), xb, gl.zeros([128, BLOCK_M], gl.float32, MMA))
            acc += part * s.to(gl.float32)[:, None]
            z, s = z1, s1
            z1, s1 = z2, s2
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        if KS > 1:
            acc = _ks_sum(acc, KS, MR)
            cols = off_n + gl.arange(0, CW, layout=gl.SliceLayout(1, acc.type.layout))
        else:
            cols = off_n + _tile_col(gl.arange(0, 128, layout=gl.SliceLayout(1, MMA)))
        # the split-K sum keeps SUM_LOADS partial tiles in flight: 8 at BLOCK_M 16 took 227 registers
        _store_tile(acc, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, split_k, 0, cols, pid, pid_k, SPLIT,
                    SUM_LOADS=8 if BLOCK_M == 8 else 2, ACC=ACC)


def tma_applies(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """quant_gemv_mma's conditions (``mma_applies``) at M <= 16, a uniform single-slice width (``TMA_BITS``;
    no codebook) and a Hopper GPU (TMA)."""
    if packed.fmt != "uniform" or packed.bits not in TMA_BITS or M > 16:
        return False
    if not mma_applies(packed, M, x):
        return False
    return torch.cuda.get_device_capability(x.device)[0] == 9


def words_descriptor(qweight: torch.Tensor, rows: int, cols: int):
    """The TMA descriptor of the int32 words ``[K / P, N]``, block ``[rows, cols]`` (made per call, as
    for the other Gluon GEMMs: a cached one would keep its weight alive)."""
    layout = gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int32)
    return TensorDescriptor(qweight, list(qweight.shape), [qweight.shape[1], 1], [rows, cols], layout)


def x_tma_fits(x: torch.Tensor, ks: int) -> bool:
    """Whether the x tiles can ride in the TMA ring (the kernel's X_TMA): one K chunk per tile (KS 1)
    and rows whose start and stride are 16-byte aligned."""
    return ks == 1 and x.stride(1) == 1 and (x.stride(0) * 2) % 16 == 0 and x.data_ptr() % 16 == 0


def x_descriptor(x: torch.Tensor, rows: int, cols: int):
    """The TMA descriptor of x ``[M, K]`` bf16, block ``[rows, cols]`` (rows >= M arrive as zeros)."""
    layout = gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16)
    return TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [rows, cols], layout)


def tma_config(M: int, N: int, K: int, G: int, sms: int, ks: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, split, ks): ``mma_config`` with this kernel's resident programs per SM
    (``TMA_PROGRAMS_PER_SM``)."""
    return mma_config(M, N, K, G, sms, ks, TMA_PROGRAMS_PER_SM)


def quant_gemv_tma(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor | None, *,
                   split_k: int | None = None, ks: int | None = None, stages: int | None = None,
                   pdl: bool | None = None, acc: torch.Tensor | None = None,
                   x_tma: bool | None = None) -> torch.Tensor:
    """y ``[M, N]`` = x ``[M, K]`` (bf16, perm applied) @ dequant(W)^T for M <= 16, 1/2/4-bit weights,
    as ``quant_gemv_mma`` (same keywords: ``split_k``, ``ks``, ``pdl``, ``acc`` for pending sums)
    with the words through a TMA ring of ``stages`` slots (default ``TMA_STAGES``). ``x_tma``: the x
    tiles through the same ring (None: ``TMA_X`` where ``x_tma_fits``; True where it does not fits is
    an error)."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if not tma_applies(packed, M, x):
        raise not_applicable("quant_gemv_tma", "a Hopper GPU", TMA_BITS, x, packed)
    bm, bk, split, ks_auto = tma_config(M, N, K, G, _num_sms(x.device))
    if ks is None:
        ks = ks_auto
    elif ks != 1 and not ks_fits(ks, M, bm, K, G, bk):
        raise ValueError(f"quant_gemv_tma: ks {ks} must be 1, 2, 4 or 8 with ks x {mma_rows(M)} <= {bm}, "
                         f"K {K} a multiple of ks x {bk} and the group size {G} a divisor or multiple of it")
    if ks != ks_auto:
        split = tma_config(M, N, K, G, _num_sms(x.device), ks)[2]
    stages = stages or TMA_STAGES
    if not 2 <= stages <= 8:
        raise ValueError(f"quant_gemv_tma: stages must be 2..8, got {stages}")
    (w0,) = SLICES[bits]
    SK = ks * bk
    per, split = k_split(K // SK, split_k or split)
    tiles = N * ks // 128
    mr = mma_rows(M) if ks > 1 else 0
    desc = words_descriptor(packed.qweight, ks * bk * w0 // 32, 128 // ks)
    pdl = pdl_enabled(x.device, pdl)
    launch = {"launch_pdl": True} if pdl else {}
    fits = x_tma_fits(x, ks)
    if x_tma and not fits:
        raise ValueError(f"quant_gemv_tma: x_tma needs ks 1 (got {ks}) and x rows with 16-byte aligned start "
                         f"and stride (got stride {x.stride(0)})")
    x_tma = fits and (TMA_X if x_tma is None else x_tma)
    xd = {"x_desc": x_descriptor(x, bm, bk), "X_TMA": True} if x_tma else {}
    consts = dict(W0=w0, BLOCK_M=bm, BLOCK_K=bk, PDL=pdl, STAGES=stages, KS=ks, MR=mr, num_warps=4,
                  maxnreg=TMA_MAX_REGISTERS, **xd, **launch)
    if acc is not None:
        check_acc(acc, M, N)
        _quant_gemv_tma_kernel[(tiles, split)](
            x, desc, packed.scales, packed.zeros, acc, acc, acc, M, N, K, G, x.stride(0), acc.stride(0),
            per * SK, per, split, SPLIT=split > 1, ACC=True, **consts)
        return acc
    ws, locks = split_k_buffers(split, M, N, tiles, y)
    _quant_gemv_tma_kernel[(tiles, split)](
        x, desc, packed.scales, packed.zeros, y, ws, locks, M, N, K, G, x.stride(0), y.stride(0), per * SK,
        per, split, SPLIT=split > 1, **consts)
    return y

