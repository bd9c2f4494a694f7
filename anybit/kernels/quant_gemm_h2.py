"""Tensor-core path with packed-half dequantization: y = x @ dequant(W)^T for 2 <= M <= 64 rows.

``_quant_gemm_h2_kernel`` (``quant_matmul(..., path="gemm", h2_dequant=True)``; the launcher's
choice in quant_matmul.py for uniform single-slice 2/4/8-bit weights and fp16/bf16 x on CUDA):
swap-AB (``y^T = W x^T``: the weight tile is the MMA's A operand, straight from registers).
Two codes per instruction ("fast int-to-half" of Marlin / FasterTransformer): one LOP3
``(w & mask) | magic`` puts two codes into the mantissas of a half2 (f16 ``0x6400 | q`` =
1024 + q; bf16 ``0x4300 | q`` = 128 + q, fields of <= 7 bits; PRMT under 0x64 for 8-bit codes),
one ``sub``/``fma`` half2 makes them ``q - C`` exactly (C = 2^(b-1)), and one ``fma`` half2 with
the column's ``(s, s)`` and ``(-(z - C) s, ...)`` gives the weights ``s (q - z)`` rounded once to
half precision: 1.5-1.9 instructions per code, no shared-memory round trip of the weight tile,
and the MMA accumulates over the whole K range (no per-tile scaling).

Only the dot product matters, so K inside a tile and N inside a column tile are permuted (the
same way for the weights and for x / the output): column k' of the A tile holds code (r, j)
(word row r, code position j) such that every thread's codes come from its own words in the
MMA's register layout (k' bit 0 = the half of the half2, bits 1-2 = low bits of r = the lanes),
and the thread's 2-4 A rows are consecutive columns n (16-byte word loads). x is loaded in
natural order and permuted in registers. The torch reference is ``ref_quant_matmul`` in
quant_matmul.py.
"""

from __future__ import annotations

import struct
import weakref

import torch

from anybit.kernels.quant_gemv_h2 import _INTERPRET, _num_sms, _pick_block_k, k_split
from anybit.quant.format import PackedWeight

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _half2(v: float, bf16: bool) -> str:
    if bf16:
        h = struct.unpack("<I", struct.pack("<f", v))[0] >> 16
        assert struct.unpack("<f", struct.pack("<I", h << 16))[0] == v, v
    else:
        h = struct.unpack("<H", struct.pack("<e", v))[0]
    return f"0x{h:04X}{h:04X}"


def _pair_layout(bits: int, p: int, bf16: bool) -> tuple[int, int]:
    """(right shift of the word, field position f) for pair p = codes (p, p + 16 // bits): after
    the (arithmetic) shift the two codes lie at bits [f*b, f*b+b) of each 16-bit half, below the
    magic's exponent (10 mantissa bits for f16, 7 for bf16). 8 bits: (0, 0), PRMT reads bytes."""
    if bits == 8:  # the PRMT picks bytes p and p + 2 of the unshifted word
        return 0, 0
    per_byte = 8 // bits
    shift, f = 8 * (p // per_byte), p % per_byte
    if bf16 and (f + 1) * bits > 7:  # the top field of a byte reaches bf16's exponent: shift it down
        shift, f = shift + f * bits, 0
    return shift, f


def _gemm_h2_asm(bits: int, p: int, bf16: bool = False) -> str:
    """PTX for pair p of the words of a b-bit slice (b in 2/4/8; 8 needs f16): inputs ``$2`` =
    the word shifted right by ``_pair_layout(...)[0]``, ``$3`` = half2 (s, s), ``$4`` = half2
    (-(z - C) s, ...); outputs ``$0, $1`` = the weights ``s (q - z)`` of codes p and p + H
    (H = 16 // b) in f16 (bf16 with ``bf16``), each rounded once. Steps: ``lop3 (w & mask) |
    magic`` = ``M + q * 2^(f*b)`` (M = 1024 f16, 128 bf16), ``sub`` / ``fma`` by 2^(-f*b) with
    ``-(M 2^(-f*b) + C)`` -> ``q - C`` exactly, ``fma`` with (s, c). 8 bits: ``prmt`` puts bytes
    p and p + 2 under the exponent byte 0x64 (1024 + q), minus 1152."""
    C = 1 << (bits - 1)
    ty = "bf16x2" if bf16 else "f16x2"
    magic, base = (0x43004300, 128.0) if bf16 else (0x64006400, 1024.0)
    lines = ["{", ".reg .b32 t, k0, k1;"]
    if bits == 8:
        assert not bf16
        lines += [f"prmt.b32 t, $2, 0x64646464, 0x{0x4240 if p == 0 else 0x4341:04X};",
                  f"mov.b32 k0, {_half2(1024.0 + C, False)};", "sub.f16x2 t, t, k0;"]
    else:
        _, f = _pair_layout(bits, p, bf16)
        mask = ((1 << bits) - 1) << (f * bits)
        lines.append(f"lop3.b32 t, $2, 0x{mask | mask << 16:08X}, 0x{magic:08X}, 0xEA;")
        sc = 2.0 ** (-f * bits)
        if f == 0 and not bf16:
            lines += [f"mov.b32 k0, {_half2(base + C, False)};", "sub.f16x2 t, t, k0;"]
        else:
            lines += [f"mov.b32 k0, {_half2(sc, bf16)};", f"mov.b32 k1, {_half2(-(base * sc + C), bf16)};",
                      f"fma.rn.{ty} t, t, k0, k1;"]
    lines += [f"fma.rn.{ty} t, t, $3, $4;", "mov.b32 {$0, $1}, t;", "}"]
    return "\n".join(lines)


if triton is not None:
    # one constexpr PTX string per (bits, f16 'H' / bf16 'B', pair)
    _A2H_0: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 0, False))
    _A2H_1: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 1, False))
    _A2H_2: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 2, False))
    _A2H_3: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 3, False))
    _A2H_4: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 4, False))
    _A2H_5: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 5, False))
    _A2H_6: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 6, False))
    _A2H_7: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 7, False))
    _A4H_0: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 0, False))
    _A4H_1: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 1, False))
    _A4H_2: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 2, False))
    _A4H_3: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 3, False))
    _A8H_0: tl.constexpr = tl.constexpr(_gemm_h2_asm(8, 0, False))
    _A8H_1: tl.constexpr = tl.constexpr(_gemm_h2_asm(8, 1, False))
    _A2B_0: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 0, True))
    _A2B_1: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 1, True))
    _A2B_2: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 2, True))
    _A2B_3: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 3, True))
    _A2B_4: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 4, True))
    _A2B_5: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 5, True))
    _A2B_6: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 6, True))
    _A2B_7: tl.constexpr = tl.constexpr(_gemm_h2_asm(2, 7, True))
    _A4B_0: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 0, True))
    _A4B_1: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 1, True))
    _A4B_2: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 2, True))
    _A4B_3: tl.constexpr = tl.constexpr(_gemm_h2_asm(4, 3, True))

    @triton.jit
    def _pair(w, s2, c2, asm: tl.constexpr, P: tl.constexpr, W0: tl.constexpr, CDT: tl.constexpr,
              USE_ASM: tl.constexpr):
        """Weights of codes P and P + 16 // W0 of every word of w, joined on a last dim of 2; the
        word's shift is ``_pair_layout``'s. s2, c2: half2 bits (PTX) or the rounded float32 values."""
        if USE_ASM:
            if W0 == 8:
                src = w
            else:
                PB: tl.constexpr = 8 // W0
                F: tl.constexpr = P % PB
                if tl.bfloat16 == CDT and (F + 1) * W0 > 7:
                    src = w >> (8 * (P // PB) + F * W0)
                else:
                    src = w >> (8 * (P // PB))
            if tl.bfloat16 == CDT:
                lo, hi = tl.inline_asm_elementwise(asm, "=h,=h,r,r,r", [src, s2, c2],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
            else:
                lo, hi = tl.inline_asm_elementwise(asm, "=h,=h,r,r,r", [src, s2, c2],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        else:  # plain-Triton twin (interpreter): the same values, also rounded once
            C: tl.constexpr = 1 << (W0 - 1)
            lo = ((((w >> (P * W0)) & ((1 << W0) - 1)) - C).to(tl.float32) * s2 + c2).to(CDT)
            hi = ((((w >> (P * W0 + 16)) & ((1 << W0) - 1)) - C).to(tl.float32) * s2 + c2).to(CDT)
        return tl.join(lo, hi)

    @triton.jit
    def _codes_tile(w, s2, c2, W0: tl.constexpr, BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, RL: tl.constexpr, USE_ASM: tl.constexpr):
        """Words ``[R, BLOCK_N]`` (+ per-column half2 s2, c2 ``[1, BLOCK_N]``) -> A tile
        ``[BLOCK_N, BLOCK_K]`` of weights in the permuted K order ``k' = h + 2 rl + 2 RL p +
        2 RL H rh`` (r = rh RL + rl; pair p with its bits in join order; half h), see ``_x_tile``."""
        R: tl.constexpr = w.shape[0]
        RH: tl.constexpr = R // RL
        if BF16:
            CDT: tl.constexpr = tl.bfloat16
        else:
            CDT: tl.constexpr = tl.float16
        if W0 == 4:
            if BF16:
                v = tl.join(tl.join(_pair(w, s2, c2, _A4B_0, 0, 4, CDT, USE_ASM),
                                    _pair(w, s2, c2, _A4B_1, 1, 4, CDT, USE_ASM)),
                            tl.join(_pair(w, s2, c2, _A4B_2, 2, 4, CDT, USE_ASM),
                                    _pair(w, s2, c2, _A4B_3, 3, 4, CDT, USE_ASM)))
            else:
                v = tl.join(tl.join(_pair(w, s2, c2, _A4H_0, 0, 4, CDT, USE_ASM),
                                    _pair(w, s2, c2, _A4H_1, 1, 4, CDT, USE_ASM)),
                            tl.join(_pair(w, s2, c2, _A4H_2, 2, 4, CDT, USE_ASM),
                                    _pair(w, s2, c2, _A4H_3, 3, 4, CDT, USE_ASM)))
            # [R, BN, h, p0, p1] -> [rh, rl, BN, h, p0, p1] -> [BN, rh, p1, p0, rl, h]
            v = tl.permute(tl.reshape(v, [RH, RL, BLOCK_N, 2, 2, 2]), (2, 0, 5, 4, 1, 3))
        elif W0 == 2:
            if BF16:
                v = tl.join(tl.join(tl.join(_pair(w, s2, c2, _A2B_0, 0, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2B_1, 1, 2, CDT, USE_ASM)),
                                    tl.join(_pair(w, s2, c2, _A2B_2, 2, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2B_3, 3, 2, CDT, USE_ASM))),
                            tl.join(tl.join(_pair(w, s2, c2, _A2B_4, 4, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2B_5, 5, 2, CDT, USE_ASM)),
                                    tl.join(_pair(w, s2, c2, _A2B_6, 6, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2B_7, 7, 2, CDT, USE_ASM))))
            else:
                v = tl.join(tl.join(tl.join(_pair(w, s2, c2, _A2H_0, 0, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2H_1, 1, 2, CDT, USE_ASM)),
                                    tl.join(_pair(w, s2, c2, _A2H_2, 2, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2H_3, 3, 2, CDT, USE_ASM))),
                            tl.join(tl.join(_pair(w, s2, c2, _A2H_4, 4, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2H_5, 5, 2, CDT, USE_ASM)),
                                    tl.join(_pair(w, s2, c2, _A2H_6, 6, 2, CDT, USE_ASM),
                                            _pair(w, s2, c2, _A2H_7, 7, 2, CDT, USE_ASM))))
            # [R, BN, h, p0, p1, p2] -> [BN, rh, p2, p1, p0, rl, h]
            v = tl.permute(tl.reshape(v, [RH, RL, BLOCK_N, 2, 2, 2, 2]), (2, 0, 6, 5, 4, 1, 3))
        else:
            v = tl.join(_pair(w, s2, c2, _A8H_0, 0, 8, CDT, USE_ASM),
                        _pair(w, s2, c2, _A8H_1, 1, 8, CDT, USE_ASM))
            # [R, BN, h, p0] -> [BN, rh, p0, rl, h]
            v = tl.permute(tl.reshape(v, [RH, RL, BLOCK_N, 2, 2]), (2, 0, 4, 1, 3))
        return tl.reshape(v, [BLOCK_N, BLOCK_K])

    @triton.jit
    def _x_tile(x, W0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RL: tl.constexpr):
        """x ``[BLOCK_M, BLOCK_K]`` in natural K order (k = r P + h H + p, the bits of p high to
        low in memory order) -> the permuted order of ``_codes_tile``."""
        P: tl.constexpr = 32 // W0
        RH: tl.constexpr = BLOCK_K // P // RL
        if W0 == 4:
            v = tl.permute(tl.reshape(x, [BLOCK_M, RH, RL, 2, 2, 2]), (0, 1, 4, 5, 2, 3))
        elif W0 == 2:
            v = tl.permute(tl.reshape(x, [BLOCK_M, RH, RL, 2, 2, 2, 2]), (0, 1, 4, 5, 6, 2, 3))
        else:
            v = tl.permute(tl.reshape(x, [BLOCK_M, RH, RL, 2, 2]), (0, 1, 4, 2, 3))
        return tl.reshape(v, [BLOCK_M, BLOCK_K])

    @triton.jit
    def _perm_n(v, BLOCK_N: tl.constexpr):
        """Last dim (BLOCK_N columns, natural order) -> the A tile's row order n', in which the
        MMA's register bits of a row (n' bit 3 and bits >= 6) are the low bits of the column:
        ``n = (n' & 8) / 8 + 2 (n' >> 6) + V ((n' & 7) + 8 ((n' >> 4) & 3))``, V = BLOCK_N / 32."""
        lead: tl.constexpr = v.shape[0]
        VH: tl.constexpr = BLOCK_N // 64
        v = tl.reshape(v, [lead, 4, 8, VH, 2])  # n = ((hi * 8 + lo) * VH + vh) * 2 + b3
        v = tl.permute(v, (0, 3, 1, 4, 2))  # n' = ((vh * 4 + hi) * 2 + b3) * 8 + lo
        return tl.reshape(v, [lead, BLOCK_N])

    @triton.jit
    def _half2_value(b, BF16: tl.constexpr):
        """float32 value of the low half of half2 bits b (bf16 or f16)."""
        if BF16:
            return (b << 16).to(tl.float32, bitcast=True)
        return (b & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit(do_not_specialize=["M", "n_iters", "split_k"])  # M, split values: no extra compiles
    def _quant_gemm_h2_kernel(x_ptr, q_ptr, sc_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G,
                              stride_xm, stride_qk, stride_ym, k_per_split, n_iters, split_k,
                              W0: tl.constexpr, BF16: tl.constexpr, XSCALE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              RL: tl.constexpr, SK_P2: tl.constexpr,
                              RED_M: tl.constexpr, ITERS: tl.constexpr, USE_ASM: tl.constexpr):
        """Tile ``[BLOCK_M, BLOCK_N]`` of y, one K split, swap-AB: ``acc += dot(A, x'^T)`` with A
        the half-precision weights of ``_codes_tile`` (rows in ``_perm_n`` order) and x' = x /
        XSCALE in the codes' dtype, permuted alike (``_x_tile``); y = XSCALE acc. With split-K the
        last program of a tile (counted in lock_ptr, which it resets to 0) sums the float32
        partials, RED_M rows at a time, with one masked 3-D load ``[SK_P2, RED_M, BLOCK_N]`` (SK_P2 =
        split_k rounded up to a power of two; all loads in flight) in a loop over the row chunks.
        (An unrolled version, ``BLOCK_M / RED_M`` chunks x SK_P2 loads, took 82 s to compile at
        SK_P2 = 64, and more than 13 minutes at BLOCK_M 64: the likely cause of the session-2
        ``--mode tc`` time-out.)"""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        P: tl.constexpr = 32 // W0
        R: tl.constexpr = BLOCK_K // P
        if BF16:
            CDT: tl.constexpr = tl.bfloat16
        else:
            CDT: tl.constexpr = tl.float16
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        r = tl.arange(0, R)
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        k_start = pid_k * k_per_split
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        w_cols = q_ptr + offs_n[None, :]
        sc_cols = offs_n[None, :]
        for i in range(0, ITERS if ITERS > 0 else n_iters):
            k0 = k_start + i * BLOCK_K
            w = tl.load(w_cols + (k0 // P + r)[:, None] * stride_qk, mask=mask_n[None, :], other=0)
            x = tl.load(x_rows + (k0 + kk)[None, :], mask=mask_m[:, None], other=0.0)
            if XSCALE == 1.0:
                xh = x.to(CDT)
            else:
                xh = (x.to(tl.float32) * (1.0 / XSCALE)).to(CDT)
            g = k0 // G  # s2 / c2: half2 bits (s, s) and (-(z - C) s, ...) of the codes' dtype
            s2 = _perm_n(tl.load(sc_ptr + g * N + sc_cols, mask=mask_n[None, :], other=0), BLOCK_N)
            c2 = _perm_n(tl.load(sc_ptr + (K // G + g) * N + sc_cols, mask=mask_n[None, :], other=0), BLOCK_N)
            if not USE_ASM:  # the twin takes the float values
                s2 = _half2_value(s2, BF16)
                c2 = _half2_value(c2, BF16)
            a = _codes_tile(_perm_n(w, BLOCK_N), s2, c2, W0, BF16, BLOCK_N, BLOCK_K, RL, USE_ASM)
            xt = tl.trans(_x_tile(xh, W0, BLOCK_M, BLOCK_K, RL))
            if ITERS > 0 and BF16:  # the interpreter's bf16 dot is wrong: float32 there
                acc = tl.dot(a.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, xt, acc)  # [BLOCK_N (permuted), BLOCK_M]
        out = tl.trans(acc)
        if XSCALE != 1.0:
            out = out * XSCALE
        on = _perm_n(offs_n[None, :], BLOCK_N)  # the columns of out, as permuted
        mask = mask_m[:, None] & (on < N)
        if SK_P2 == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + on, out.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptr + pid_k * M * N + offs_m[:, None] * N + on, out, mask=mask)
            lock = lock_ptr + pid
            if tl.atomic_add(lock, 1, sem="acq_rel") == split_k - 1:  # last split of this tile
                tl.store(lock, 0)  # the counters stay zeroed between calls
                sk = tl.arange(0, SK_P2)[:, None, None]
                for mc in range(0, BLOCK_M, RED_M):  # a loop, not unrolled: the code stays small
                    om = pid_m * BLOCK_M + mc + tl.arange(0, RED_M)
                    mk = (om < M)[:, None] & mask_n[None, :]
                    part = ws_ptr + sk * M * N + (om[:, None] * N + offs_n[None, :])[None, :, :]
                    tot = tl.sum(tl.load(part, mask=(sk < split_k) & mk[None, :, :], other=0.0,
                                         cache_modifier=".cg"), axis=0)  # one 3-D load: all in flight
                    tl.store(y_ptr + om[:, None] * stride_ym + offs_n[None, :],
                             tot.to(y_ptr.dtype.element_ty), mask=mk)


GEMM_H2_BITS = (2, 4, 8)  # single-slice uniform widths of the packed-half tensor-core path
GEMM_H2_MIN_M, GEMM_H2_MAX_M = 2, 64  # "auto" uses it for these M (fp16/bf16 x on CUDA)
_XSCALE = 16.0  # bf16/fp32 x -> f16 codes' dtype as x / 16 (no overflow below |x| = 1.05e6)
_locks: dict = {}  # device -> zeroed split-K counters
_old_locks: list = []  # replaced counter buffers stay alive: a captured CUDA graph may use them
_tables: dict = {}  # id(scales) -> (weakref to scales, key, table)

# Registers per thread of the compiled kernel, (bits, BLOCK_M, BLOCK_N, warps) -> regs, from an
# offline sm_90 compile with Triton 3.6's ptxas at SK_P2 = 8 (notes_quant.md, "Session 3"; the
# larger of bf16 / f16 codes, rounded up to the allocation unit of 8; none of these spills).
# Stages (3..6) change them by <= 8; the split-K sum's width (SK_P2, RED_M) by up to +60 at
# BLOCK_M 64 (ptxas then takes up to 255), where shared memory limits residency to 2 anyway.
# Configurations outside the table start from 255 and take the compiled kernel's count.
_TC_REGS = {
    (2, 16, 128, 4): 128, (2, 32, 128, 4): 168, (2, 64, 128, 4): 184,
    (4, 16, 128, 4): 128, (4, 32, 128, 4): 168, (4, 64, 128, 4): 192,
    (8, 16, 128, 4): 152, (8, 32, 128, 4): 160, (8, 64, 128, 4): 248,
    (4, 16, 64, 4): 96, (4, 32, 64, 4): 96, (4, 64, 64, 4): 152,
    (4, 16, 128, 8): 120, (4, 32, 128, 8): 120, (4, 64, 128, 8): 192,
    (2, 16, 256, 8): 176, (2, 32, 256, 8): 184, (2, 64, 256, 8): 192,
    (4, 16, 256, 8): 216, (4, 32, 256, 8): 184, (4, 64, 256, 8): 192,
    (8, 16, 256, 8): 160, (8, 32, 256, 8): 200, (8, 64, 256, 8): 200,
}
_REGS_PER_SM, _SMEM_PER_SM = 65536, 232448  # H100 / H200: registers, shared memory bytes per SM
_RESIDENT: dict = {}  # launch config -> programs resident per SM, from the compiled kernel
TC_MAX_SPLIT = 16  # split-K at most this (the last program's sum loads SK_P2 * RED_M * BLOCK_N)
TC_MIN_ITERS = 4  # and at least this many K tiles per program (the pipeline's prologue)


def tc_shared_bytes(bits: int, bm: int, bn: int, bk: int, stages: int) -> int:
    """Shared memory of the compiled kernel: (stages - 1) buffers of words + x + the half2 table,
    plus the permuted x tile of the MMA (matches the offline compiles to the byte)."""
    return (stages - 1) * (bn * bk * bits // 8 + bm * bk * 2 + 2 * bn * 4) + bm * bk * 2


def tc_resident(regs: int, warps: int, shared: int) -> int:
    """Programs of one configuration that fit on an SM at once (registers, shared memory, warps)."""
    by_regs = _REGS_PER_SM // (-(-regs // 8) * 8 * 32 * warps)
    return max(1, min(by_regs, _SMEM_PER_SM // (shared + 1024), 64 // warps))


def tc_config(M: int, bits: int) -> tuple[int, int, int, int]:
    """The launcher's (BLOCK_M, BLOCK_N, num_warps, num_stages) for M rows: BLOCK_M the power of
    two >= M in 16..64 (the MMA's N side; rows beyond M are masked), 128 columns, 4 warps, 4
    stages, or 3 where the 4th buffer would cost a resident program (W8 at BLOCK_M 32 / 64)."""
    bm = max(16, min(64, triton.next_power_of_2(M)))
    bn, warps, stages = 128, 4, 4
    regs = _TC_REGS.get((bits, bm, bn, warps), 255)
    if tc_resident(regs, warps, tc_shared_bytes(bits, bm, bn, 128, 4)) < \
            tc_resident(regs, warps, tc_shared_bytes(bits, bm, bn, 128, 3)):
        stages = 3
    return bm, bn, warps, stages


def tc_split(tiles: int, k_tiles: int, slots: int) -> int:
    """Split-K: the largest divisor of k_tiles with all tiles * split programs resident at once
    (one wave: a second, partial wave would pay the per-program latency again), at most
    TC_MAX_SPLIT and leaving each program >= TC_MIN_ITERS K tiles; 1 when the tiles fill the GPU."""
    best = 1
    for s in range(2, min(TC_MAX_SPLIT, k_tiles // TC_MIN_ITERS) + 1):
        if k_tiles % s == 0 and tiles * s <= slots:
            best = s
    return best


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _lock_buffer(device: torch.device, n: int, tag: str = "split_k") -> torch.Tensor:
    """Split-K counters that the kernel leaves at zero: one zeroed buffer per device (one stream at
    a time uses it, as for the GEMV's counters), grown outside CUDA-graph capture (the old one is
    kept alive for graphs captured with it); inside a capture a missing/short one is made fresh
    (a memset node in the graph: warm up outside the capture to avoid it)."""
    key = f"{device}/{tag}"  # a tag per user (split-K GEMMs, decode attention): separate counters
    buf = _locks.get(key)
    if buf is None or buf.numel() < n:
        fresh = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        if _capturing(device):
            return fresh
        if buf is not None:
            _old_locks.append(buf)
        _locks[key] = buf = fresh
    return buf


def scale_table(packed: PackedWeight, bf16: bool) -> torch.Tensor:
    """int32 ``[2, K // G, N]``: half2 bits of ``(s, s)`` and of ``(-(z - C) s, ...)`` (C = 2^(b-1))
    in bf16 or f16, rounded once from float32: the kernel's per-column operands. Cached per
    scales tensor (and its and the zeros' in-place versions); not cached while a CUDA graph is
    being captured."""
    key = (bf16, packed.scales._version, packed.zeros._version, packed.zeros.data_ptr())
    hit = _tables.get(id(packed.scales))
    if hit is not None and hit[0]() is packed.scales and hit[1] == key:
        return hit[2]
    s = packed.scales.float()
    c = ((1 << (packed.bits - 1)) - packed.zeros.float()) * s
    dt = torch.bfloat16 if bf16 else torch.float16
    bits = torch.stack([s, c]).to(dt).view(torch.int16).to(torch.int32) & 0xFFFF
    table = (bits | (bits << 16)).contiguous()
    if not _capturing(packed.scales.device):
        for k in [k for k, v in _tables.items() if v[0]() is None]:  # drop dead weights' tables
            del _tables[k]
        _tables[id(packed.scales)] = (weakref.ref(packed.scales), key, table)
    return table


def quant_gemm_h2(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_m: int | None = None,
                  block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None,
                  use_asm: bool | None = None, bf16_codes: bool | None = None) -> torch.Tensor:
    """Packed-half tensor-core GEMM (uniform single-slice 2/4/8 bits, fp16/bf16/fp32 x, any M):
    x ``[M, K]`` contiguous (perm applied), y ``[M, N]``. Weights ``s (q - z)`` are rounded once
    to bf16 (``bf16_codes``; default for bf16 x at 2/4 bits) or f16 (x then rounded to f16 as
    x / 16 when it is bf16/fp32, so |x| < 1e6), float32 accumulation. ``s (q - C)`` must stay
    in f16 range (|s| < 256)."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if packed.fmt != "uniform" or bits not in GEMM_H2_BITS:
        raise ValueError(f"h2_dequant: needs a uniform 2/4/8-bit weight, got {packed.fmt} {bits}-bit")
    if bf16_codes is None:
        bf16_codes = x.dtype == torch.bfloat16 and bits != 8
    if bf16_codes and bits == 8:
        raise ValueError("h2_dequant: bf16_codes needs 2/4-bit codes (8-bit codes use f16)")
    if use_asm is None:
        use_asm = x.is_cuda and not _INTERPRET
    P = 32 // bits
    bm0, bn0, warps0, stages0 = tc_config(M, bits)
    BM = block_m or bm0
    BN = block_n or bn0
    warps = num_warps or (warps0 if bn0 == BN else max(4, BN // 32))
    BK = _pick_block_k(G, K, block_k or 128)
    stages = num_stages or (stages0 if (bm0, bn0, 128) == (BM, BN, BK) else 4)
    if BK < 2 * P or BN < 64:
        raise ValueError(f"h2_dequant: needs block_k >= {2 * P} (got {BK}) and block_n >= 64 (got {BN})")
    RL = min(4, BK // P)
    num_m, num_n = triton.cdiv(M, BM), triton.cdiv(N, BN)
    tiles = num_m * num_n
    k_tiles = K // BK
    occ_key = (bits, BM, BN, BK, warps, stages)
    if split_k is None:
        per_sm = _RESIDENT.get(occ_key) or tc_resident(_TC_REGS.get((bits, BM, BN, warps), 255), warps,
                                                       tc_shared_bytes(bits, BM, BN, BK, stages))
        split_k = tc_split(tiles, k_tiles, per_sm * _num_sms(x.device))
    per, split_k = k_split(k_tiles, split_k)
    if split_k > 1:
        ws = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        locks = _lock_buffer(x.device, tiles)
    else:
        ws, locks = y, y
    sk_p2 = triton.next_power_of_2(split_k)  # constexpr: one compile per power of two
    red_m = max(1, min(BM, 8192 // (sk_p2 * BN)))  # <= 64 partials per thread per load at 4 warps
    xscale = 1.0 if bf16_codes or x.dtype == torch.float16 else _XSCALE
    table = scale_table(packed, bool(bf16_codes))
    kernel = _quant_gemm_h2_kernel[(tiles, split_k)](
        x, packed.qweight, table, y, ws, locks, M, N, K, G, x.stride(0), packed.qweight.stride(0),
        y.stride(0), per * BK, per, split_k,
        bits, bool(bf16_codes), xscale, BM, BN, BK, RL, sk_p2, red_m, per if _INTERPRET else 0,
        bool(use_asm), num_warps=warps, num_stages=stages)
    regs = getattr(kernel, "n_regs", 0) if x.is_cuda else 0
    if regs and occ_key not in _RESIDENT and (bits, BM, BN, warps) not in _TC_REGS:
        # a configuration outside the table: its compiled kernel's residency for the next split
        # choice (table entries stay fixed, so a configuration keeps one split: no second compile)
        _RESIDENT[occ_key] = tc_resident(regs, warps, getattr(kernel.metadata, "shared", 0) or 0)
    return y
