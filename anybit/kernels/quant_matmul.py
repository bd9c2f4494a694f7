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
  half-precision arithmetic (Marlin / FasterTransformer "fast int-to-half"): one LOP3 (PRMT for
  8 bits) places two codes into the mantissas of an f16x2 ``0x6400 | q`` (= 1024 + q), one
  ``sub``/``fma.f16x2`` makes it ``q - 2^(b-1)`` exactly, one ``fma.f16x2`` multiplies two codes by
  two x values; the f16 lane sums of one word (8 codes at 4 bits) go to float32. x is prepared once
  per call (``_prep_x_h2_kernel``): f16 pairs scaled by 2^-S, and per-word sums for the zero term.
  On CUDA the word's math is one inline-PTX block; elsewhere (interpreter) plain Triton ops compute
  the same function in float32.

Codes of a slice of width w are read as whole int32 words: row ``k // (32//w)`` of the slice,
shifted by ``(k % (32//w)) * w`` (the repeated words of a tile come from L1).
"""

from __future__ import annotations

import functools
import os
import struct

import torch

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


def _f16x2(v: float) -> str:
    h = struct.unpack("<H", struct.pack("<e", v))[0]
    return f"0x{h:04X}{h:04X}"


def _h2_asm(bits: int, words: int) -> str:
    """PTX for the packed-half GEMV: inputs ``$1..$words`` = words of a b-bit slice (b in 2/4/8),
    then ``H = 16 // b`` x pairs per word (f16x2, x * 2^-S); output ``$0`` = float32
    ``sum x' (q - C)`` over the words' codes, C = 2^(b-1), the f16 lane sums converted once.

    Pair j of a word is codes (j, j + H): bits ``[j*b, j*b+b)`` and ``[j*b+16, ...)``, the lo and
    hi halves of an f16x2. 2/4 bits: ``lop3 (w & mask) | 0x64006400`` (and the same on ``w >> 8``)
    gives ``1024 + q * 2^(f*b)`` for the field f of a byte; ``sub`` (f = 0) or ``fma`` by 2^(-f*b)
    with ``-(1024 * 2^(-f*b) + C)`` makes it ``q - C``, exactly. 8 bits: ``prmt`` puts bytes 0/2
    (then 1/3) under the exponent byte 0x64, minus 1152. Then one ``fma.f16x2`` per pair with x."""
    H, C = 16 // bits, 1 << (bits - 1)
    ext, fields, consts = [], [], {}

    def k(v: float) -> str:
        return consts.setdefault(v, f"k{len(consts)}")

    for wi in range(words):
        src = f"${1 + wi}"
        if bits == 8:
            ext += [f"prmt.b32 a{wi}_0, {src}, 0x64646464, 0x4240;",
                    f"prmt.b32 a{wi}_1, {src}, 0x64646464, 0x4341;"]
            fields += [(f"a{wi}_0", 0), (f"a{wi}_1", 0)]
            continue
        ext.append(f"shr.u32 u{wi}, {src}, 8;")
        for half, reg in enumerate((src, f"u{wi}")):
            for f in range(8 // bits):
                mask = ((1 << bits) - 1) << (f * bits)
                name = f"a{wi}_{half * (8 // bits) + f}"
                ext.append(f"lop3.b32 {name}, {reg}, 0x{mask | mask << 16:08X}, 0x64006400, 0xEA;")
                fields.append((name, f))
    conv = []
    for reg, f in fields:
        if f == 0:
            conv.append(f"sub.f16x2 {reg}, {reg}, {k(1024.0 + C)};")
        else:
            sc = 2.0 ** (-f * bits)
            conv.append(f"fma.rn.f16x2 {reg}, {reg}, {k(sc)}, {k(-(1024.0 * sc + C))};")
    dot = [f"mul.f16x2 p, {reg}, ${1 + words + i};" if i == 0 else
           f"fma.rn.f16x2 p, {reg}, ${1 + words + i}, p;" for i, (reg, _) in enumerate(fields)]
    assert len(fields) == words * H
    regs = [r for r, _ in fields] + [f"u{wi}" for wi in range(words) if bits != 8] + ["p", *consts.values()]
    tail = ["mov.b32 {lo, hi}, p;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 $0, f0, f1;", "}"]
    return "\n".join(["{", f".reg .b32 {', '.join(regs)};", ".reg .b16 lo, hi;", ".reg .f32 f0, f1;"]
                     + [f"mov.b32 {n}, {_f16x2(v)};" for v, n in consts.items()] + ext + conv + dot + tail)


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
        out = tl.sum(acc, axis=0)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, out, mask=mask_n)
            lock = lock_ptr + m * tl.num_programs(1) + pid_n
            if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:  # last split of this tile
                tot = tl.zeros([BLOCK_N], dtype=tl.float32)
                for sk in range(0, SPLIT_K):
                    tot += tl.load(ws_ptr + (sk * M + m) * N + offs_n, mask=mask_n, other=0.0,
                                   cache_modifier=".cg")
                tl.store(y_ptr + m * stride_ym + offs_n, tot.to(y_ptr.dtype.element_ty), mask=mask_n)

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


if triton is not None:
    # ---- M = 1 path with packed half arithmetic (see the module docstring) ------------------------
    _ASM_H2_W2_1: tl.constexpr = tl.constexpr(_h2_asm(2, 1))
    _ASM_H2_W2_2: tl.constexpr = tl.constexpr(_h2_asm(2, 2))
    _ASM_H2_W4_1: tl.constexpr = tl.constexpr(_h2_asm(4, 1))
    _ASM_H2_W4_2: tl.constexpr = tl.constexpr(_h2_asm(4, 2))
    _ASM_H2_W8_1: tl.constexpr = tl.constexpr(_h2_asm(8, 1))
    _ASM_H2_W8_2: tl.constexpr = tl.constexpr(_h2_asm(8, 2))

    @triton.jit
    def _prep_x_h2_kernel(x_ptr, xq_ptr, xs_ptr, lock_ptr, K, stride_xm, n_locks,
                          P0: tl.constexpr, XSCALE: tl.constexpr, BLOCK_R: tl.constexpr,
                          LOCK_BLOCK: tl.constexpr):
        """x row m -> ``xq [M, K/2]`` int32 f16x2 pairs ``(x[rP+j], x[rP+j+H]) * 2^-S`` at
        ``r*H + j`` (the pairing of the PTX above), ``xs [M, K/P]`` float32: the sum of the word's
        x values as rounded in xq (so the zero term matches the dot exactly); program (m, 0) also
        zeroes row m's split-K counters."""
        m = tl.program_id(0)
        pr = tl.program_id(1)
        H: tl.constexpr = P0 // 2
        rows = K // P0
        rr = pr * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, H)
        mr = rr < rows
        base = x_ptr + m * stride_xm + rr[:, None] * P0 + j[None, :]
        lo = (tl.load(base, mask=mr[:, None], other=0.0).to(tl.float32) * (1.0 / XSCALE)).to(tl.float16)
        hi = (tl.load(base + H, mask=mr[:, None], other=0.0).to(tl.float32) * (1.0 / XSCALE)).to(tl.float16)
        xs = (tl.sum(lo.to(tl.float32), 1) + tl.sum(hi.to(tl.float32), 1)) * XSCALE
        tl.store(xs_ptr + m * rows + rr, xs, mask=mr)
        lo_b = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi_b = hi.to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(xq_ptr + m * (K // 2) + rr[:, None] * H + j[None, :], (hi_b << 16) | lo_b, mask=mr[:, None])
        if LOCK_BLOCK > 0:  # noqa: SIM102 (constexpr test, then a run-time one)
            if pr == 0:
                ol = tl.arange(0, LOCK_BLOCK)
                tl.store(lock_ptr + m * n_locks + ol, tl.zeros([LOCK_BLOCK], dtype=tl.int32),
                         mask=ol < n_locks)

    @triton.jit
    def _xp(xq, j):
        return tl.load(xq + j)[:, None]

    @triton.jit
    def _word_dot_ref(w, xq, W0: tl.constexpr):
        """Plain-Triton twin of one word's PTX (float32 products, no f16 rounding)."""
        C: tl.constexpr = 1 << (W0 - 1)
        MASK: tl.constexpr = (1 << W0) - 1
        d = tl.zeros(w.shape, dtype=tl.float32)
        for j in tl.static_range(16 // W0):
            xw = tl.load(xq + j)
            xlo = (xw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            xhi = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            qlo = ((w >> (j * W0)) & MASK) - C
            qhi = ((w >> (j * W0 + 16)) & MASK) - C
            d += xlo[:, None] * qlo.to(tl.float32) + xhi[:, None] * qhi.to(tl.float32)
        return d

    @triton.jit
    def _word_dot_h2(wa, wb, xa, xb, W0: tl.constexpr, WPT: tl.constexpr, USE_ASM: tl.constexpr):
        """``[R', BLOCK_N]`` float32: sum over the codes of word wa (and wb when WPT == 2) of
        x' (q - 2^(W0-1)); ``xa``/``xb [R']`` point at each word row's first x pair. One PTX block
        per element on CUDA (the f16 lane sums of the WPT words go to float32 once); plain Triton
        in float32 otherwise."""
        if USE_ASM:
            if WPT == 1:
                if W0 == 4:
                    d = tl.inline_asm_elementwise(
                        _ASM_H2_W4_1, "=f" + ",r" * 5,
                        [wa, _xp(xa, 0), _xp(xa, 1), _xp(xa, 2), _xp(xa, 3)],
                        dtype=tl.float32, is_pure=True, pack=1)
                elif W0 == 2:
                    d = tl.inline_asm_elementwise(
                        _ASM_H2_W2_1, "=f" + ",r" * 9,
                        [wa, _xp(xa, 0), _xp(xa, 1), _xp(xa, 2), _xp(xa, 3), _xp(xa, 4), _xp(xa, 5),
                         _xp(xa, 6), _xp(xa, 7)], dtype=tl.float32, is_pure=True, pack=1)
                else:
                    d = tl.inline_asm_elementwise(_ASM_H2_W8_1, "=f" + ",r" * 3, [wa, _xp(xa, 0), _xp(xa, 1)],
                                                  dtype=tl.float32, is_pure=True, pack=1)
            else:
                if W0 == 4:
                    d = tl.inline_asm_elementwise(
                        _ASM_H2_W4_2, "=f" + ",r" * 10,
                        [wa, wb, _xp(xa, 0), _xp(xa, 1), _xp(xa, 2), _xp(xa, 3),
                         _xp(xb, 0), _xp(xb, 1), _xp(xb, 2), _xp(xb, 3)],
                        dtype=tl.float32, is_pure=True, pack=1)
                elif W0 == 2:
                    d = tl.inline_asm_elementwise(
                        _ASM_H2_W2_2, "=f" + ",r" * 18,
                        [wa, wb, _xp(xa, 0), _xp(xa, 1), _xp(xa, 2), _xp(xa, 3), _xp(xa, 4), _xp(xa, 5),
                         _xp(xa, 6), _xp(xa, 7), _xp(xb, 0), _xp(xb, 1), _xp(xb, 2), _xp(xb, 3), _xp(xb, 4),
                         _xp(xb, 5), _xp(xb, 6), _xp(xb, 7)], dtype=tl.float32, is_pure=True, pack=1)
                else:
                    d = tl.inline_asm_elementwise(
                        _ASM_H2_W8_2, "=f" + ",r" * 6,
                        [wa, wb, _xp(xa, 0), _xp(xa, 1), _xp(xb, 0), _xp(xb, 1)],
                        dtype=tl.float32, is_pure=True, pack=1)
        else:
            d = _word_dot_ref(wa, xa, W0)
            if WPT == 2:
                d += _word_dot_ref(wb, xb, W0)
        return d

    @triton.jit
    def _quant_gemv_h2_kernel(xq_ptr, xs_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G,
                              stride_qk, stride_sg, stride_ym, k_per_split, n_iters,
                              W0: tl.constexpr, XSCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ITERS: tl.constexpr,
                              USE_ASM: tl.constexpr, WPT: tl.constexpr):
        """One row m, BLOCK_N columns, one K split, single-slice uniform W0 in {2, 4, 8}:
        ``y = sum_tiles s * (2^S * sum x'(q - C) - (z - C) * sum x)`` with the word dot of
        ``_word_dot_h2``. The tile's R = BLOCK_K / P word rows are loaded as WPT slabs of R / WPT
        rows (one PTX block takes one word of each slab); the next tile is loaded before the
        current one is used; g (scale group) is advanced by a counter, no division in the loop;
        split-K partials are summed by the last program of a column tile, as in the GEMV."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        P0: tl.constexpr = 32 // W0
        H: tl.constexpr = P0 // 2
        RH: tl.constexpr = BLOCK_K // P0 // WPT
        C: tl.constexpr = 1 << (W0 - 1)
        r = tl.arange(0, RH)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([RH, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        xq_row = xq_ptr + m * (K // 2)
        xs_row = xs_ptr + m * (K // P0)
        n = ITERS if ITERS > 0 else n_iters
        mask2 = mask_n[None, :]
        wp = q_ptr + (k_start // P0 + r)[:, None] * stride_qk + offs_n[None, :]
        step = (BLOCK_K // P0) * stride_qk
        nwa = tl.load(wp, mask=mask2, other=0)
        nwb = nwa
        if WPT == 2:
            nwb = tl.load(wp + RH * stride_qk, mask=mask2, other=0)
        tpg = G // BLOCK_K
        g = k_start // G
        t = (k_start // BLOCK_K) % tpg
        for i in range(0, n):
            k0 = k_start + i * BLOCK_K
            wa = nwa
            wb = nwb
            wp += tl.where(i + 1 < n, step, 0)  # prefetch (the last one repeats)
            nwa = tl.load(wp, mask=mask2, other=0)
            if WPT == 2:
                nwb = tl.load(wp + RH * stride_qk, mask=mask2, other=0)
            s = tl.load(s_ptr + g * stride_sg + offs_n[None, :], mask=mask2, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_sg + offs_n[None, :], mask=mask2, other=0.0).to(tl.float32)
            t += 1
            g += tl.where(t == tpg, 1, 0)
            t = tl.where(t == tpg, 0, t)
            rows = k0 // P0 + r
            xs = tl.load(xs_row + rows)
            if WPT == 2:
                xs += tl.load(xs_row + rows + RH)
            d = _word_dot_h2(wa, wb, xq_row + rows * H, xq_row + (rows + RH) * H, W0, WPT, USE_ASM)
            acc += (s * XSCALE) * d  # two FFMA per element
            acc -= (s * (z - C)) * xs[:, None]
        out = tl.sum(acc, axis=0)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, out, mask=mask_n)
            lock = lock_ptr + m * tl.num_programs(1) + pid_n
            if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:  # last split of this tile
                tot = tl.zeros([BLOCK_N], dtype=tl.float32)
                for sk in range(0, SPLIT_K):
                    tot += tl.load(ws_ptr + (sk * M + m) * N + offs_n, mask=mask_n, other=0.0,
                                   cache_modifier=".cg")
                tl.store(y_ptr + m * stride_ym + offs_n, tot.to(y_ptr.dtype.element_ty), mask=mask_n)


H2_BITS = (2, 4, 8)  # launcher: widths that take the packed-half GEMV at M <= H2_MAX_M (fp16/bf16 x, CUDA)
H2_MAX_M = 1
H2_WORDS_PER_ASM = 2  # words whose f16 lane sums are added before the float32 conversion
# BLOCK_N by width: measured on the H200 (benchmarks/results/quant_matmul_h2.json), 256 was the
# fastest or within 4% for W4 on all four shapes, 128 for W2 and W8.
H2_BLOCK_N = {2: 128, 4: 256, 8: 128}
# "auto" turns on the tensor-core path's in-place dequantization (fast_dequant) for these widths
# at 2 <= M <= FAST_DEQUANT_MAX_M: measured at M = 16 (H200) 5-17% faster than the default for
# W4 on all four shapes and W2 on three (lm_head W2: 6% slower); no gain for W8.
FAST_DEQUANT_BITS = (2, 4)
FAST_DEQUANT_MAX_M = 16
_H2_XSCALE = {2: 16.0, 4: 32.0, 8: 256.0}  # x' = x / XSCALE in f16: lane sums (2 words) < 65504 for |x| < 32k


def quant_gemv_h2(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_n: int | None = None,
                  block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                  use_asm: bool | None = None, words_per_asm: int | None = None) -> torch.Tensor:
    """Packed-half GEMV (uniform, single-slice 2/4/8 bits): x ``[M, K]`` contiguous (perm applied),
    y ``[M, N]``. Products x * (q - 2^(b-1)) are f16 (x scaled by 2^-S, exact for bf16 x in
    range), summed in f16 over one word (4/8/2 pairs), then in float32."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if packed.fmt != "uniform" or bits not in H2_BITS:
        raise ValueError(f"path gemv_h2: needs a uniform 2/4/8-bit weight, got {packed.fmt} {bits}-bit")
    if use_asm is None:
        use_asm = x.is_cuda and not _INTERPRET
    P0 = 32 // bits
    BN = block_n or H2_BLOCK_N[bits]
    BK = _pick_block_k(G, K, block_k or 128)
    wpt = words_per_asm or H2_WORDS_PER_ASM
    if wpt not in (1, 2) or (BK // P0) % wpt:
        wpt = 1
    num_n = triton.cdiv(N, BN)
    tiles = num_n * M
    sms = _num_sms(x.device)
    k_tiles = K // BK
    if split_k is None:
        split_k = max(1, min(k_tiles, (4 * sms + tiles - 1) // tiles)) if tiles < 2 * sms else 1
    per = next(d for d in range(triton.cdiv(k_tiles, max(1, split_k)), k_tiles + 1) if k_tiles % d == 0)
    split_k = k_tiles // per
    xq = torch.empty(M, K // 2, dtype=torch.int32, device=x.device)
    xs = torch.empty(M, K // P0, dtype=torch.float32, device=x.device)
    if split_k > 1:
        ws = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        locks = torch.empty(tiles, dtype=torch.int32, device=x.device)
    else:
        ws, locks = y, xq
    xscale = _H2_XSCALE[bits]
    BR = 256
    _prep_x_h2_kernel[(M, triton.cdiv(K // P0, BR))](
        x, xq, xs, locks, K, x.stride(0), num_n, P0, xscale, BR,
        triton.next_power_of_2(num_n) if split_k > 1 else 0, num_warps=4)
    _quant_gemv_h2_kernel[(M, num_n, split_k)](
        xq, xs, packed.qweight, packed.scales, packed.zeros, y, ws, locks, M, N, K, G,
        packed.qweight.stride(0), packed.scales.stride(0), y.stride(0), per * BK, per,
        bits, xscale, BN, BK, split_k, per if _INTERPRET else 0, bool(use_asm), wpt,
        num_warps=num_warps or 4, num_stages=1)
    return y


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


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GEMV_MAX_M = 1  # launcher: GEMV kernel up to this many rows, fused dequant + tensor cores above,
DEQUANT_MIN_M = 128  # and from this many rows dequantize to a scratch W^T + cuBLAS


def _pick_block_k(G: int, K: int, want: int) -> int:
    for bk in (want, 128, 64, 32):
        if bk <= want and G % bk == 0 and K % bk == 0:
            return bk
    raise ValueError(f"group_size {G} / in_features {K}: need a common divisor in 32, 64, 128")


@functools.lru_cache(maxsize=16)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def quant_matmul(x: torch.Tensor, packed: PackedWeight, out: torch.Tensor | None = None, *,
                 path: str = "auto", block_n: int | None = None, block_k: int | None = None,
                 block_m: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, swap: bool | None = None,
                 fast_dequant: bool | None = None, use_asm: bool | None = None,
                 words_per_asm: int | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ nothing). x ``[M, K]`` fp16/bf16/fp32, packed ``PackedWeight``
    for ``W [N, K]`` -> y ``[M, N]`` in x.dtype (written into ``out`` when given, e.g. a column
    slice of a fused output). ``path``: "auto" (the packed-half GEMV for M <= H2_MAX_M when the
    weight is uniform 2/4/8-bit and x fp16/bf16 on CUDA, else the GEMV for M <= GEMV_MAX_M, tensor
    cores above), "gemv", "gemv_h2", "gemm", "dequant"; the block/split/swap keywords override the
    heuristics (benchmarks); ``use_asm`` (gemv_h2): inline PTX (default on CUDA) or plain Triton,
    ``words_per_asm`` (gemv_h2): words (1 or 2) per PTX block, i.e. per float32 conversion;
    ``fast_dequant`` selects the in-place dequantization of the tensor-core path (single-slice
    uniform widths only; None: on under "auto" for FAST_DEQUANT_BITS at M <= FAST_DEQUANT_MAX_M,
    off for an explicit path="gemm")."""
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
    if path == "auto":
        h2 = (M <= H2_MAX_M and not is_cb and packed.bits in H2_BITS and x.is_cuda and not _INTERPRET
              and x.dtype in (torch.float16, torch.bfloat16))
        path = "gemv_h2" if h2 else "gemv" if M <= GEMV_MAX_M else "gemm" if M < DEQUANT_MIN_M else "dequant"
        if path == "gemm" and fast_dequant is None:
            fast_dequant = packed.bits in FAST_DEQUANT_BITS and M <= FAST_DEQUANT_MAX_M
    if path == "dequant":
        return dequant_matmul(x, packed, out)
    if path == "gemv_h2":
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        return quant_gemv_h2(x, packed, y, block_n=block_n, block_k=block_k, split_k=split_k,
                             num_warps=num_warps, use_asm=use_asm, words_per_asm=words_per_asm)
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
        raise ValueError(f"path: got {path!r}, allowed: auto, gemv, gemv_h2, gemm, dequant")
    k_tiles = K // BK
    if split_k is None:  # enough programs to fill the GPU ~4 times over
        split_k = max(1, min(k_tiles, (4 * sms + tiles - 1) // tiles)) if tiles < 2 * sms else 1
    per = next(d for d in range(triton.cdiv(k_tiles, max(1, split_k)), k_tiles + 1) if k_tiles % d == 0)
    split_k = k_tiles // per
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
