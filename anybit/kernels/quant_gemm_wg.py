"""Hopper tensor-core GEMM for packed 2/4/8-bit weights, written in Gluon: y = x @ dequant(W)^T.

Why Gluon: in plain Triton a ``tl.dot`` whose operand is computed in the loop (our dequantized
weights) is never made asynchronous; the compiled loop waits for every wgmma to finish before it
dequantizes the next tile (``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after each HGMMA group in the SASS of
quant_gemm_h2.py), so conversion and MMA never overlap inside a program. Here the loop is written
out: the wgmma of tile i runs while tile i + 1 is converted.

``_quant_gemm_wg_kernel``: one program = ``BLOCK_N`` weight rows (output columns) x ``BLOCK_M``
rows of x, one K split; swap-AB (``y^T = W x^T``: the weights are the wgmma's A operand, 64 rows
per warpgroup, and x rows its N side, 16..256). Per K tile (BLOCK_K):

1. A TMA ring of STAGES slots (one mbarrier each): the x tile ``[BLOCK_M, BLOCK_K]`` (rows >= M
   read as 0), the words ``[BLOCK_K / P, BLOCK_N]`` (P codes per int32 word) and the two
   scale-table rows of the tile's group; tiles are requested STAGES - 1 iterations ahead on one
   warpgroup (STAGES - 2 on two).
2. The words go from shared memory to registers; one PTX block per word (``_wg_asm``) turns its P
   codes into the bf16 weights ``s (q - z)``, each rounded once: ``lop3 (w & mask) | 0x4300`` puts
   two codes into the mantissas of a bf16x2 (128 + q), an exact ``fma`` makes them ``q - C``
   (C = 2^(b-1)), a second ``fma`` with the column's half2 ``(s, s)`` and ``((C - z) s, ...)``
   (quant_gemm_h2.scale_table) gives the weights; 8-bit codes go through float32 (bf16 has 7
   mantissa bits). The tile is stored, in natural K order, into one of two bf16 buffers in the
   wgmma's swizzled layout.
3. ``warpgroup_mma`` (async) of that buffer with the x tile; ``warpgroup_mma_wait(1)`` leaves it
   running while the next iteration converts.

One CTA barrier per tile after the weights are stored (the wgmma reads all warps' rows; it also
frees the slot of an earlier tile), one more on two warpgroups before the A buffer is rewritten.
With split-K, the last program of a tile (``lock_ptr`` counter, reset to 0 by it) adds the float32
partials.

Testing: Gluon kernels do not run under ``TRITON_INTERPRET``. On CPU the tests check the PTX by
bit-level emulation and compile the kernel for sm_90 (Triton's bundled ptxas) to check its loop
(async wgmma kept in flight); on CUDA they compare with ``ref_quant_matmul``.
"""

from __future__ import annotations

import torch

from anybit.kernels.quant_gemm_h2 import _half2, _lock_buffer, _pair_layout, scale_table
from anybit.kernels.quant_gemv_h2 import _INTERPRET, _num_sms, k_split
from anybit.quant.format import PackedWeight

try:  # Gluon (Triton >= 3.5) is optional: CPU installs and older Triton use the other paths
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover
    gluon = None

WG_BITS = (2, 4, 8)  # single-slice uniform widths of this path


def _wg_asm(bits: int) -> str:
    """PTX for one word of a b-bit slice (b in 2/4/8; bf16 weights): inputs ``$P`` = the word,
    ``$P+1`` = half2 (s, s), ``$P+2`` = half2 ((C - z) s, ...) in bf16 bits; outputs ``$0..$P-1``
    = the bf16 weights ``s (q_j - C) + (C - z) s`` of codes j = 0..P-1 (bits [j b, j b + b)),
    each rounded once (8 bits: via float32, rounded twice: to float32 then to bf16)."""
    P, C = 32 // bits, 1 << (bits - 1)
    w, s2, c2 = f"${P}", f"${P + 1}", f"${P + 2}"
    if bits == 8:  # float32 2^23 + q from each byte (prmt under 0x4B), - (2^23 + C), * s + c
        lines = ["{", ".reg .b32 t, e, sf, cf;", ".reg .f32 f;", "mov.b32 e, 0x4B000000;",
                 f"shl.b32 sf, {s2}, 16;", f"shl.b32 cf, {c2}, 16;"]
        for j in range(4):
            lines += [f"prmt.b32 t, {w}, e, 0x{0x7540 + j:04X};", "mov.b32 f, t;",
                      f"sub.rn.f32 f, f, 0f{0x4B000000 + C:08X};", "fma.rn.f32 f, f, sf, cf;",
                      f"cvt.rn.bf16.f32 ${j}, f;"]
        return "\n".join(lines + ["}"])
    H = P // 2  # pair p = codes (p, p + H): the low and high halves of a bf16x2
    lines = ["{", ".reg .b32 t, u, k0, k1;"]
    for p in range(H):
        shift, f = _pair_layout(bits, p, True)
        mask = ((1 << bits) - 1) << (f * bits)
        sc = 2.0 ** (-f * bits)
        src = w
        if shift:
            lines.append(f"shr.u32 u, {w}, {shift};")
            src = "u"
        lines += [f"lop3.b32 t, {src}, 0x{mask | mask << 16:08X}, 0x43004300, 0xEA;",
                  f"mov.b32 k0, {_half2(sc, True)};", f"mov.b32 k1, {_half2(-(128.0 * sc + C), True)};",
                  "fma.rn.bf16x2 t, t, k0, k1;", f"fma.rn.bf16x2 t, t, {s2}, {c2};",
                  f"mov.b32 {{${p}, ${p + H}}}, t;"]
    return "\n".join(lines + ["}"])


if gluon is not None:
    _WG_ASM2: gl.constexpr = gl.constexpr(_wg_asm(2))
    _WG_ASM4: gl.constexpr = gl.constexpr(_wg_asm(4))
    _WG_ASM8: gl.constexpr = gl.constexpr(_wg_asm(8))

    @gluon.constexpr_function
    def _word_layout(rows, cols, num_warps):
        """Layout of the words ``[R, BLOCK_N]`` for conversion: each thread takes R / tr word rows
        of one column (one table load per column; its stores fill an A row), the lanes run along
        the columns (conflict-free shared-memory reads), tr = 32 x warps / BLOCK_N lanes share a
        column when there are fewer columns than threads."""
        tr = min(rows, max(1, 32 * num_warps // cols))
        return gl.BlockedLayout([rows // tr, 1], [tr, 32 // tr], [1, num_warps], [0, 1])

    @gluon.jit
    def _join8(o0, o1, o2, o3, o4, o5, o6, o7):
        """``[...]`` x 8 -> ``[..., 2, 2, 2]`` whose row-major flattening is o0..o7 (nested joins:
        the outermost join is the last dimension, i.e. bit 0 of the index)."""
        return gl.join(gl.join(gl.join(o0, o4), gl.join(o2, o6)), gl.join(gl.join(o1, o5), gl.join(o3, o7)))

    @gluon.jit
    def _words_tile(v, R: gl.constexpr, BN: gl.constexpr, P: gl.constexpr):
        """Joined codes ``[R, BN, (2,) * log2 P]`` -> ``[BN, R * P]`` (k = r P + code index)."""
        v = gl.reshape(v, [R, BN, P])
        return gl.reshape(gl.permute(v, (1, 0, 2)), [BN, R * P])

    @gluon.jit
    def _convert_words(w, s2, c2, W0: gl.constexpr):
        """Words ``[R, BN]`` int32 -> bf16 weights ``[BN, R * P]`` in natural K order (k = r P + j)."""
        if W0 == 4:
            o0, o1, o2, o3, o4, o5, o6, o7 = gl.inline_asm_elementwise(
                _WG_ASM4, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [w, s2, c2], dtype=(gl.bfloat16,) * 8,
                is_pure=True, pack=1)
            v = _join8(o0, o1, o2, o3, o4, o5, o6, o7)
        elif W0 == 2:
            o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = gl.inline_asm_elementwise(
                _WG_ASM2, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [w, s2, c2],
                dtype=(gl.bfloat16,) * 16, is_pure=True, pack=1)
            v = gl.join(_join8(o0, o2, o4, o6, o8, o10, o12, o14), _join8(o1, o3, o5, o7, o9, o11, o13, o15))
        else:
            o0, o1, o2, o3 = gl.inline_asm_elementwise(
                _WG_ASM8, "=h,=h,=h,=h,r,r,r", [w, s2, c2], dtype=(gl.bfloat16,) * 4, is_pure=True, pack=1)
            v = gl.join(gl.join(o0, o2), gl.join(o1, o3))
        return _words_tile(v, w.shape[0], w.shape[1], 32 // W0)

    @gluon.jit
    def _issue_tile(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, bars, stage, k0, off_m, off_n, G, KG,
                    valid, P: gl.constexpr):
        """TMA of the K tile starting at k0 into ring slot ``stage`` (x rows, words, the two table
        rows of its scale group), all counted on ``bars[stage]``; nothing when not ``valid``."""
        bar = bars.index(stage)
        nbytes: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes
                                + 2 * t_desc.block_type.nbytes)
        mbarrier.expect(bar, nbytes, pred=valid)
        g = k0 // G
        tma.async_copy_global_to_shared(x_desc, [off_m, k0], bar, x_smem.index(stage), pred=valid)
        tma.async_copy_global_to_shared(w_desc, [k0 // P, off_n], bar, w_smem.index(stage), pred=valid)
        tma.async_copy_global_to_shared(t_desc, [g, off_n], bar, t_smem.index(2 * stage), pred=valid)
        tma.async_copy_global_to_shared(t_desc, [KG + g, off_n], bar, t_smem.index(2 * stage + 1), pred=valid)

    @gluon.jit
    def _tile_cols(acc, off_n):
        """Output columns ``off_n + [0, BLOCK_N)`` of the rows of ``acc [BLOCK_N, BLOCK_M]``."""
        return off_n + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, acc.type.layout))

    @gluon.jit
    def _store_tile(acc, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, split_k, off_m, on, pid, pid_k,
                    SPLIT: gl.constexpr, SUM_LOADS: gl.constexpr = 8, ACC: gl.constexpr = False,
                    defer_rt=0):
        """Epilogue of the tensor-core kernels: the float32 tile ``acc [BLOCK_N, BLOCK_M]`` (row r =
        output column ``on[r]``) to y; with SPLIT, to this split's partials in ws, and the tile's
        last program (``lock_ptr`` counter, reset to 0 by it) adds the partials in split order (the
        same bits every call), SUM_LOADS loads in flight at a time (registers: SUM_LOADS x the
        tile), into y. ACC: added into the float32 accumulator ws_ptr (rows ``stride_ym`` apart;
        anybit/layers/pending.py) by fire-and-forget float atomics; no order, no last program. ``defer_rt``
        != 0 (a run-time value, with SPLIT): only this split's partials to ws, split_k_sum.py's kernel adds
        them; the kernel is still compiled with the last-program sum, so its loop keeps that compile's
        registers and schedule (as a constexpr, quant_gemv_mma's W2 lost both: s30-3)."""
        MMA: gl.constexpr = acc.type.layout
        BLOCK_N: gl.constexpr = acc.shape[0]
        BLOCK_M: gl.constexpr = acc.shape[1]
        om = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        omask = (on < N)[:, None] & (om < M)[None, :]
        if ACC:
            gl.atomic_add(ws_ptr + om[None, :] * stride_ym + on[:, None], acc, mask=omask, sem="relaxed")
        elif SPLIT:
            part = om[None, :] * N + on[:, None]
            gl.store(ws_ptr + pid_k * M * N + part, acc, mask=omask)
            if defer_rt == 0:
                gl.thread_barrier()
                count = gl.atomic_add(lock_ptr + pid, 1, sem="acq_rel")
                if count == split_k - 1:  # the last split of this tile adds the partials, in split order
                    tot = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)  # (deterministic: not its own first)
                    for sk0 in range(0, split_k, SUM_LOADS):
                        for j in gl.static_range(SUM_LOADS):
                            sk = sk0 + j
                            tot += gl.load(ws_ptr + sk * M * N + part, mask=omask & (sk < split_k), other=0.0,
                                           cache_modifier=".cg")
                    gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], tot.to(y_ptr.dtype.element_ty),
                             mask=omask)
                    gl.atomic_xchg(lock_ptr + pid, 0)  # counters stay zeroed between calls
        else:
            gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=omask)

    @gluon.jit(do_not_specialize=["M", "n_iters", "split_k"])
    def _quant_gemm_wg_kernel(x_desc, w_desc, t_desc, y_ptr, ws_ptr, lock_ptr, M, N, K, G, stride_ym,
                              k_per_split, n_iters, split_k, W0: gl.constexpr, STAGES: gl.constexpr,
                              SPLIT: gl.constexpr, num_warps: gl.constexpr):
        """Tile ``[BLOCK_M, BLOCK_N]`` of y for one K split of ``k_per_split`` (= n_iters tiles of
        BLOCK_K). Descriptors: x ``[M, K]`` bf16 (block [BLOCK_M, BLOCK_K]; rows >= M read as 0),
        the int32 words ``[K / P, N]`` (block [BLOCK_K / P, BLOCK_N]) and the int32 half2 table
        ``[2 K / G, N]`` (block [1, BLOCK_N]); y ``[M, N]`` (row stride stride_ym). SPLIT:
        split_k > 1 (float32 partials in ws, summed by the tile's last program)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        R: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_m = gl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        WL: gl.constexpr = _word_layout(R, BLOCK_N, num_warps)
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        A_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, R, BLOCK_N], w_desc.layout)
        t_smem = gl.allocate_shared_memory(gl.int32, [2 * STAGES, 1, BLOCK_N], t_desc.layout)
        a_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, BLOCK_K], A_SL)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        k_start = pid_k * k_per_split
        KG = K // G
        # tiles requested DIST ahead: the slot refilled at iteration i held tile i + DIST - STAGES,
        # whose wgmma is complete once this warpgroup waited (one warpgroup: tile i - 1) or once
        # every warpgroup passed the barrier after its wait (two: tile i - 2)
        DIST: gl.constexpr = STAGES - 1 if num_warps == 4 else STAGES - 2
        for s in gl.static_range(DIST):  # prologue: tiles 0 .. DIST - 1
            _issue_tile(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, bars, s, k_start + s * BLOCK_K,
                        off_m, off_n, G, KG, s < n_iters, 32 // W0)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        for i in range(n_iters):
            stage = i % STAGES
            mbarrier.wait(bars.index(stage), (i // STAGES) & 1)
            if num_warps > 4:  # another warpgroup's wgmma i - 2 may still read a_smem[i % 2]
                gl.thread_barrier()
            w = w_smem.index(stage).load(WL)
            s2 = t_smem.index(2 * stage).load(WL)  # [1, BLOCK_N]: (s, s) of each column
            c2 = t_smem.index(2 * stage + 1).load(WL)  # ((C - z) s, ...)
            a = _convert_words(w, s2, c2, W0)
            buf = a_smem.index(i % 2)
            buf.store(a)
            fence_async_shared()
            gl.thread_barrier()  # every warp's rows of the A tile are written; tile i - 2 is consumed
            acc = warpgroup_mma(buf, x_smem.index(stage).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            nxt = i + DIST
            _issue_tile(x_desc, w_desc, t_desc, x_smem, w_smem, t_smem, bars, nxt % STAGES,
                        k_start + nxt * BLOCK_K, off_m, off_n, G, KG, nxt < n_iters, 32 // W0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        cols = _tile_cols(acc, off_n)
        _store_tile(acc, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, split_k, off_m, cols, pid, pid_k, SPLIT)


WG_MIN_M = 2  # quant_gemm_wg runs for M >= WG_MIN_M (bf16 x, uniform 2/4/8 bits, Hopper)


def wg_applies(packed: PackedWeight, M: int, x: torch.Tensor, widths: tuple[int, ...] = WG_BITS) -> bool:
    """Whether the Gluon tensor-core path can run this call: Hopper (sm_90), bf16 x, a uniform weight of
    one of ``widths`` (this kernel's: the single-slice 2/4/8 bits) whose N, K and group size are
    multiples of 64, and the 16-byte alignment that TMA needs (x and the words)."""
    if gluon is None or _INTERPRET or not x.is_cuda or x.dtype != torch.bfloat16 or M < WG_MIN_M:
        return False
    if packed.fmt != "uniform" or packed.bits not in widths or packed.zeros is None:
        return False
    if packed.in_features % 64 or packed.group_size % 64 or packed.out_features % 64:
        return False
    q = packed.qweight  # TMA: 16-byte aligned bases and row strides, unit inner stride
    if x.data_ptr() % 16 or q.data_ptr() % 16 or q.stride(1) != 1 or q.stride(0) % 4 or x.stride(1) != 1:
        return False
    return torch.cuda.get_device_capability(x.device)[0] == 9


def wg_split(M: int, N: int, K: int, bm: int, bn: int, bk: int, sms: int) -> int:
    """Split-K for BLOCK_M <= 64: doubled while the programs are fewer than 2 per SM and each keeps
    >= 4 K tiles (the pipeline's depth); 1 at BLOCK_M 128 (its split-K sum spills registers)."""
    tiles = -(-M // bm) * -(-N // bn)
    k_tiles = K // bk
    split = 1
    while bm <= 64 and tiles * split < 2 * sms and k_tiles % (split * 2) == 0 and k_tiles // (split * 2) >= 4:
        split *= 2
    return split


def wg_config(M: int, N: int, K: int, G: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages) of the launcher (warps: 4 per 64 weight rows; split-K:
    ``wg_split``): BLOCK_M the power of
    two >= M in 16..128 (rows of x: the wgmma's N side); 64 weight rows per program on 4 warps
    (one 64-row block per warpgroup: with two, ptxas serializes the wgmma, warning C7514/C7515),
    BLOCK_K 64, stages 4 / 6 / 4 at BLOCK_M <= 32 / 64 / 128. Chosen
    from the H100 sweep of session 4 (benchmarks/results/quant_matmul_wg.json, rows
    anybit_wg_bm*_bn*_bk*_st*): BLOCK_N 128 on 8 warps and BLOCK_K 128 were slower at every M;
    4-8 stages lie within ~15%, 6 best at BLOCK_M 64 on the MLP shapes."""
    bm = max(16, min(128, triton.next_power_of_2(M)))
    return bm, 64, 64, 6 if bm == 64 else 4


def wg_shared_bytes(bm: int, bn: int, bk: int, stages: int, bits: int) -> int:
    """Shared memory of one program: per stage the x tile, the words and two table rows, plus the
    two bf16 A buffers and the barriers."""
    return stages * (bm * bk * 2 + bn * bk * bits // 8 + 2 * bn * 4 + 8) + 2 * bn * bk * 2


def quant_gemm_wg(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_m: int | None = None,
                  block_n: int | None = None, block_k: int | None = None, stages: int | None = None,
                  num_warps: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """y ``[M, N]`` = x ``[M, K]`` (bf16, contiguous, perm applied) @ dequant(W)^T on Hopper; the
    weights are rounded once to bf16. Keywords override ``wg_config`` (benchmarks)."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if not wg_applies(packed, M, x):
        raise ValueError(f"quant_gemm_wg: needs Hopper, bf16 x and a uniform 2/4/8-bit weight with K, N, "
                         f"group multiples of 64 (got {x.dtype} x, {packed.fmt} {bits}-bit, N {N}, K {K}, "
                         f"G {G})")
    sms = _num_sms(x.device)
    bm, bn, bk, st = wg_config(M, N, K, G)
    BM, BN, BK = block_m or bm, block_n or bn, block_k or bk
    stages, warps = stages or st, num_warps or 4 * BN // 64
    if (BK % (32 // bits) or G % BK or K % BK or BN % (16 * warps) or stages < 3
            or wg_shared_bytes(BM, BN, BK, stages, bits) > 227 * 1024):
        raise ValueError(f"quant_gemm_wg: block_k {BK} must divide the group size {G} and K {K}, block_n "
                         f"{BN} must be a multiple of 16 x warps ({warps}), stages >= 3 (got {stages}), "
                         f"shared memory <= 227 KB")
    per, split = k_split(K // BK, split_k or wg_split(M, N, K, BM, BN, BK, sms))
    tiles = -(-M // BM) * -(-N // BN)
    if split > 1:
        ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        locks = _lock_buffer(x.device, tiles)
    else:
        ws, locks = y, y
    table = scale_table(packed, True).view(2 * (K // G), N)
    P = 32 // bits
    x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [BM, BK],
                              gl.NVMMASharedLayout.get_default_for([BM, BK], gl.bfloat16))
    w_desc = TensorDescriptor(packed.qweight, [K // P, N], [packed.qweight.stride(0), 1], [BK // P, BN],
                              gl.NVMMASharedLayout(0, 32, rank=2))
    t_desc = TensorDescriptor(table, [2 * (K // G), N], [N, 1], [1, BN], gl.NVMMASharedLayout(0, 32, rank=2))
    _quant_gemm_wg_kernel[(tiles, split)](
        x_desc, w_desc, t_desc, y, ws, locks, M, N, K, G, y.stride(0), per * BK, per, split, bits, stages,
        split > 1, num_warps=warps)
    return y
