"""Packed-half GEMV for any-bit weights at M = 1 (uniform 2/4/8 bits; 3/5/6 with integer zeros).

``_quant_gemv_h2_kernel`` (``quant_matmul(..., path="gemv_h2")``, chosen by the launcher in
quant_matmul.py): packed half-precision arithmetic (Marlin / FasterTransformer "fast
int-to-half"): one LOP3 (PRMT for 8 bits) places two codes into the mantissas of an f16x2
``0x6400 | q`` (= 1024 + q), one ``fma.f16x2`` makes it ``(q - 2^(b-1)) * 2^-S`` exactly, one
``fma.f16x2`` multiplies two codes by two x values; the f16 lane sums of the words go to float32
once. x is converted inside the GEMV (``FUSE_X``, the default): each program turns the x values
of its own K range into f16 pairs (``cvt.rn.f16x2.f32``, one instruction per pair) and their
float32 sums (the zero term), so one launch does the whole product; ``fuse_x=False`` keeps the
older separate preparation kernel for comparison. Split-K partials are added by the last program
of a column tile in one 2-D load; its counter resets itself, so the persistent counters need no
memset per call. W8 (``split_k_sum.defer_default``) stores them only, and split_k_sum.py's second
kernel adds them. On CUDA the word's math is inline PTX; elsewhere (interpreter) plain Triton
computes the same function in float32. Shared launcher helpers (block-K choice, SM count,
split-K row store) live here too. The torch reference is ``ref_quant_matmul`` in quant_matmul.py.

Two-slice widths (3 = 2+1, 5 = 4+1, 6 = 4+2; ``_quant_gemv_h2s_kernel``, ``_h2s_asm``): the slice-1
bits of a slice-0 word are moved into the slice-0 word's pairing (one prmt, one shift) and
converted by a second lop3 + fma whose result is the addend of the slice-0 fma, so the codes
reach the x fma as exact ``(q - z) 2^-S`` with no second x chain; folded zero only (integer zero
points: ``gemv_table``), other zero points keep the generic GEMV of quant_matmul.py.
"""

from __future__ import annotations

import functools
import os
import struct
import weakref

import torch

from anybit.kernels import split_k_sum as split_sum
from anybit.kernels.pdl import pdl_enabled
from anybit.quant.format import SLICES, PackedWeight

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pick_block_k(G: int, K: int, want: int) -> int:
    for bk in (want, 128, 64, 32):
        if bk <= want and G % bk == 0 and K % bk == 0:
            return bk
    raise ValueError(f"group_size {G} / in_features {K}: need a common divisor in 32, 64, 128")


def k_split(k_tiles: int, split_k: int) -> tuple[int, int]:
    """(K tiles per program, split) for a wanted split of k_tiles: the smallest divisor of k_tiles
    that is >= k_tiles / split_k tiles per program, so every split gets the same number."""
    per = next(d for d in range(-(-k_tiles // max(1, split_k)), k_tiles + 1) if k_tiles % d == 0)
    return per, k_tiles // per


@functools.lru_cache(maxsize=16)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4


_COUNTERS: dict = {}
_COUNTERS_MIN = 1 << 16


def split_k_counters(device, n: int) -> torch.Tensor:
    """Persistent zeroed int32 split-K tile counters (>= n) for ``device``. Kernels that use them
    reset each counter they finish with, so they stay zero between calls (one stream at a time).
    Allocated outside CUDA-graph capture (the engine warms up before capturing)."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K counters must be allocated before CUDA-graph capture: run the "
                               "layer once outside the graph first")
        buf = torch.zeros(max(n, _COUNTERS_MIN), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _f16x2(v: float) -> str:
    h = struct.unpack("<H", struct.pack("<e", v))[0]
    return f"0x{h:04X}{h:04X}"


# S: codes are (q - C) * 2^-S in f16, so the f16 lane sums stay below 65504 for |x| < 32k
# (single slice, |q - C| <= 2^(b-1)); with the folded zero |q - z| <= 2^b - 1 halves that to 16k.
# Two-slice widths (folded zero only; one PTX block = the slice-0 words of H2S_NV slice-1 words):
# 32 (W3, W5) / 16 (W6) products per f16 lane, max |(q - z) 2^-S| = 7/64, 31/256, 63/256, so a lane
# sum stays below 65504 for |x| < 18.7k / 16.9k / 16.6k.
H2_SHIFT = {2: 4, 3: 6, 4: 5, 5: 8, 6: 8, 8: 8}
H2_SLICE_BITS = (3, 5, 6)  # two-slice widths of the packed-half GEMV (integer zero points only)


def _h2_asm(bits: int, words: int, zfold: bool = False) -> str:
    """PTX for the packed-half GEMV: inputs ``$1..$words`` = words of a b-bit slice (b in 2/4/8),
    then ``H = 16 // b`` x pairs per word (f16x2); output ``$0`` = float32
    ``sum x (q - C) 2^-S`` over the words' codes, C = 2^(b-1), S = H2_SHIFT[b], the f16 lane sums
    converted once.

    Pair j of a word is codes (j, j + H): bits ``[j*b, j*b+b)`` and ``[j*b+16, ...)``, the lo and
    hi halves of an f16x2. 2/4 bits: ``lop3 (w & mask) | 0x64006400`` (and the same on ``w >> 8``)
    gives ``1024 + q * 2^(f*b)`` for the field f of a byte; ``fma`` by 2^(-f*b-S) with
    ``-(1024 * 2^(-f*b) + C) 2^-S`` makes it ``(q - C) 2^-S``, exactly. 8 bits: ``prmt`` puts bytes
    0/2 (then 1/3) under the exponent byte 0x64 (1024 + q), then the same fma. Then one
    ``fma.f16x2`` per pair with x.

    ``zfold``: the zero point is folded into the code conversion: two more inputs, the column's
    table word t (``gemv_table``: f16 s in the low half, f16 ``-z 2^-S`` in the high half) and the
    float32 accumulator; the fma's addend becomes ``K_f + (-z 2^-S, -z 2^-S)`` (one ``add.f16x2``
    per field) so the codes come out as ``(q - z) 2^-S``, exact for integer z, and the output is
    ``acc + s * sum x (q - z) 2^-S``: no x sums and no zero term outside."""
    H, C, S = 16 // bits, 1 << (bits - 1), H2_SHIFT[bits]
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
    conv, zadd = [], []
    t_in, acc_in = f"${1 + words + len(fields)}", f"${2 + words + len(fields)}"
    for reg, f in fields:
        sc = 2.0 ** (-f * bits)
        if zfold:  # addend -(1024 sc + z) 2^-S = K_f + zz, built once per field
            if f"c{f}" not in zadd[0::2]:
                zadd += [f"c{f}", f"add.rn.f16x2 c{f}, zz, {k(-1024.0 * sc * 2.0 ** -S)};"]
            conv.append(f"fma.rn.f16x2 {reg}, {reg}, {k(sc * 2.0 ** -S)}, c{f};")
        else:
            addend = k(-(1024.0 * sc + C) * 2.0 ** -S)
            conv.append(f"fma.rn.f16x2 {reg}, {reg}, {k(sc * 2.0 ** -S)}, {addend};")
    dot = [f"mul.f16x2 p, {reg}, ${1 + words + i};" if i == 0 else
           f"fma.rn.f16x2 p, {reg}, ${1 + words + i}, p;" for i, (reg, _) in enumerate(fields)]
    assert len(fields) == words * H
    regs = [r for r, _ in fields] + [f"u{wi}" for wi in range(words) if bits != 8] + ["p", *consts.values()]
    head = []
    if zfold:
        regs += ["zz", *zadd[0::2]]
        head = [f"prmt.b32 zz, {t_in}, 0, 0x3232;", *zadd[1::2]]
    lanes = ["mov.b32 {lo, hi}, p;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;"]
    if zfold:
        tail = lanes + ["add.f32 f0, f0, f1;", f"mov.b32 {{lo, hi}}, {t_in};", "cvt.f32.f16 f1, lo;",
                        f"fma.rn.f32 $0, f0, f1, {acc_in};", "}"]
    else:
        tail = lanes + ["add.f32 $0, f0, f1;", "}"]
    movs = [f"mov.b32 {n}, {_f16x2(v)};" for v, n in consts.items()]
    return "\n".join(["{", f".reg .b32 {', '.join(regs)};", ".reg .b16 lo, hi;", ".reg .f32 f0, f1;"]
                     + movs + head + ext + conv + dot + tail)



def _h2s_slice1(bits: int, i: int, n: int) -> tuple[list[str], list[tuple[str, int]]]:
    """Slice-1 bits of slice-0 word i (0 <= i < w0 / w1: its place under its slice-1 word ``$v``;
    registers named by n): the instructions that build the register(s) and, per pair j (codes
    j, j + H0 of word i), (register, f1): the slice-1 field of code j sits at bit f1 of the low
    half, that of code j + H0 at bit 16 + f1. f1 >= w0 + 1 keeps the addend of the slice-1 fma
    exact in f16 (see ``_h2s_asm``); f1 + w1 <= 10 keeps the field inside the mantissa. 5 bits:
    ``v4`` is ``$v >> 4``."""
    x, y = f"x{n}", f"y{n}"
    if bits == 3:  # 32 codes per slice-1 word: word i = bits 16i..16i+15; byte 2i: codes 0-7, 2i+1: 8-15
        sel = (2 * i) | 4 << 4 | (2 * i + 1) << 8 | 4 << 12  # bytes 1, 3 <- 0 (byte 0 of the zero source)
        ins = [f"prmt.b32 {x}, $v, 0, 0x{sel:04X};", f"shl.b32 {y}, {x}, 4;"]
        return ins, [(y, 4 + j) if j < 4 else (x, j) for j in range(8)]
    if bits == 5:  # one byte per slice-0 word: codes 0-3 from byte i of v, codes 4-7 from byte i of v >> 4
        sel = i | i << 4 | (4 + i) << 8 | (4 + i) << 12
        ins = [f"prmt.b32 {x}, $v, v4, 0x{sel:04X};", f"shl.b32 {y}, {x}, 5;"]
        return ins, [(y, 5 + j) for j in range(4)]
    # bits == 6: 2-bit codes, 16 bits per slice-0 word; byte 2i: codes 0-3, 2i+1: 4-7, each in both
    # bytes of its half
    sel = (2 * i) | (2 * i) << 4 | (2 * i + 1) << 8 | (2 * i + 1) << 12
    ins = [f"prmt.b32 {x}, $v, 0, 0x{sel:04X};", f"shl.b32 {y}, {x}, 3;"]
    return ins, [(x, 8), (y, 5), (y, 7), (x, 6)]


def _h2s_asm(bits: int, nv: int = 2) -> str:
    """PTX for the two-slice packed-half GEMV with the folded zero (bits 3 = 2+1, 5 = 4+1, 6 = 4+2;
    q = q0 + 2^w0 q1, anybit/quant/format.py). Inputs: ``$1..$R`` the R = nv * w0 / w1 slice-0
    words covered by nv (1 or 2) slice-1 words, those slice-1 words, then ``H0 = 16 // w0`` x
    pairs (f16x2) per slice-0 word in the pairing of ``_h2_asm`` (pair j = codes j, j + H0), the
    column's table word t (``gemv_table``: f16 s | f16 -z 2^-S) and the float32 accumulator.
    Output ``$0 = acc + s * sum x (q - z) 2^-S`` (S = H2_SHIFT[bits]).

    Per pair: slice 0 as in ``_h2_asm``: ``lop3 (w & m0) | 0x64006400`` = 1024 + q0 2^(f0 w0);
    slice 1: ``lop3 (X & m1) | 0x64006400`` = 1024 + q1 2^f1 (X from ``_h2s_slice1``: one prmt and
    one shift per slice-0 word); ``fma`` by 2^(w0 - S - f1) with the addend
    c = -(2^(10 + w0 - f1) + 2^(10 - f0 w0) + z) 2^-S gives (2^w0 q1 - 2^(10 - f0 w0) - z) 2^-S,
    the addend of the slice-0 ``fma`` by 2^(-f0 w0 - S), which gives (q - z) 2^-S. Every value is
    an integer below 2048 times a power of two (f1 >= w0 + 1), so both fmas are exact; c is built
    once per block and (f0, f1) by one ``add.f16x2`` from the table word. Then one ``fma.f16x2`` per
    pair with x; the f16 lane sums of the block go to float32 once."""
    w0, w1 = SLICES[bits]
    ratio, H0, S = w0 // w1, 16 // w0, H2_SHIFT[bits]
    R = nv * ratio
    nx = R * H0
    xin, t_in, acc_in = 1 + R + nv, f"${1 + R + nv + nx}", f"${2 + R + nv + nx}"
    consts: dict = {}

    def k(val: float) -> str:
        return consts.setdefault(val, f"k{len(consts)}")

    ext, regs, conv, zadd, cnames = [], [], [], [], {}
    for i in range(R):
        src, v = f"${1 + i}", f"${1 + R + i // ratio}"
        if bits == 5 and i % ratio == 0:
            ext.append(f"shr.u32 v4_{i // ratio}, {v}, 4;")
            regs.append(f"v4_{i // ratio}")
        ins, s1 = _h2s_slice1(bits, i % ratio, i)
        ext += [line.replace("$v", v).replace("v4", f"v4_{i // ratio}") for line in ins]
        regs += [f"x{i}", f"y{i}", f"u{i}"]
        ext.append(f"shr.u32 u{i}, {src}, 8;")
        for j in range(H0):
            half, f0 = divmod(j, 8 // w0)
            m0 = ((1 << w0) - 1) << (f0 * w0)
            m1 = ((1 << w1) - 1) << s1[j][1]
            a, b = f"a{i}_{j}", f"b{i}_{j}"
            regs += [a, b]
            ext.append(f"lop3.b32 {a}, {(src, f'u{i}')[half]}, 0x{m0 | m0 << 16:08X}, 0x64006400, 0xEA;")
            ext.append(f"lop3.b32 {b}, {s1[j][0]}, 0x{m1 | m1 << 16:08X}, 0x64006400, 0xEA;")
            f1 = s1[j][1]
            assert w0 + 1 <= f1 and f1 + w1 <= 10
            key = (f0, f1)
            if key not in cnames:
                cnames[key] = c = f"c{len(cnames)}"
                kc = -(2.0 ** (10 + w0 - f1) + 2.0 ** (10 - f0 * w0)) * 2.0 ** -S
                zadd.append(f"add.rn.f16x2 {c}, zz, {k(kc)};")
            conv.append(f"fma.rn.f16x2 {b}, {b}, {k(2.0 ** (w0 - S - f1))}, {cnames[key]};")
            conv.append(f"fma.rn.f16x2 {a}, {a}, {k(2.0 ** (-f0 * w0 - S))}, {b};")
    dot = [f"mul.f16x2 p, a{i}_{j}, ${xin + i * H0 + j};" if i == j == 0 else
           f"fma.rn.f16x2 p, a{i}_{j}, ${xin + i * H0 + j}, p;" for i in range(R) for j in range(H0)]
    regs += ["p", "zz", *cnames.values(), *consts.values()]
    movs = [f"mov.b32 {n}, {_f16x2(val)};" for val, n in consts.items()]
    head = [f"prmt.b32 zz, {t_in}, 0, 0x3232;", *zadd]
    tail = ["mov.b32 {lo, hi}, p;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 f0, f0, f1;",
            f"mov.b32 {{lo, hi}}, {t_in};", "cvt.f32.f16 f1, lo;", f"fma.rn.f32 $0, f0, f1, {acc_in};", "}"]
    return "\n".join(["{", f".reg .b32 {', '.join(regs)};", ".reg .b16 lo, hi;", ".reg .f32 f0, f1;"]
                      + movs + head + ext + conv + dot + tail)

if triton is not None:
    @triton.jit
    def _store_row_split_k(out, y_ptr, ws_ptr, lock_ptr, m, pid_n, pid_k, M, N, offs_n, mask_n, stride_ym,
                           SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr = False,
                           DEFER: tl.constexpr = False):
        """Store one row's ``[BLOCK_N]`` float32 partial. ACC: added into the float32 accumulator
        ws_ptr (rows ``stride_ym`` apart; anybit/layers/pending.py) by a fire-and-forget float
        atomic; its reader zeroes it; summation order not fixed. Without split-K straight to y;
        with it to the ``[SPLIT_K, M, N]`` workspace, and the last split of the tile (counted in
        lock_ptr) adds the partials, 16 at a time in one 2-D load, writes y and resets the
        counter; with DEFER only to the workspace (split_k_sum.py adds them)."""
        if ACC:
            tl.atomic_add(ws_ptr + m * stride_ym + offs_n, out, mask=mask_n, sem="relaxed")
        elif SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.store(ws_ptr + (pid_k * M + m) * N + offs_n, out, mask=mask_n)
            if not DEFER:
                lock = lock_ptr + m * tl.num_programs(1) + pid_n
                if tl.atomic_add(lock, 1, sem="acq_rel") == SPLIT_K - 1:  # last split of this tile
                    sk = tl.arange(0, 16)
                    tot = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for s0 in range(0, SPLIT_K, 16):
                        rows = s0 + sk
                        part = tl.load(ws_ptr + (rows[:, None] * M + m) * N + offs_n[None, :],
                                       mask=(rows[:, None] < SPLIT_K) & mask_n[None, :], other=0.0,
                                       cache_modifier=".cg")
                        tot += tl.sum(part, axis=0)
                    tl.store(y_ptr + m * stride_ym + offs_n, tot.to(y_ptr.dtype.element_ty), mask=mask_n)
                    tl.atomic_xchg(lock, 0)  # counters stay zero between calls

    # ---- M = 1 path with packed half arithmetic (see the module docstring) ------------------------
    _ASM_H2_W2_1: tl.constexpr = tl.constexpr(_h2_asm(2, 1))
    _ASM_H2_W4_1: tl.constexpr = tl.constexpr(_h2_asm(4, 1))
    _ASM_H2_W4_2: tl.constexpr = tl.constexpr(_h2_asm(4, 2))
    _ASM_H2_W8_1: tl.constexpr = tl.constexpr(_h2_asm(8, 1))
    _ASM_H2_W8_2: tl.constexpr = tl.constexpr(_h2_asm(8, 2))
    _ASMZ_H2_W2_1: tl.constexpr = tl.constexpr(_h2_asm(2, 1, True))
    _ASMZ_H2_W4_1: tl.constexpr = tl.constexpr(_h2_asm(4, 1, True))
    _ASMZ_H2_W4_2: tl.constexpr = tl.constexpr(_h2_asm(4, 2, True))
    _ASMZ_H2_W8_1: tl.constexpr = tl.constexpr(_h2_asm(8, 1, True))
    _ASMZ_H2_W8_2: tl.constexpr = tl.constexpr(_h2_asm(8, 2, True))

    @triton.jit
    def _prep_x_h2_kernel(x_ptr, xq_ptr, xs_ptr, K, stride_xm, P0: tl.constexpr, BLOCK_R: tl.constexpr):
        """(``fuse_x=False`` only) x row m -> ``xq [M, K/2]`` int32 f16x2 pairs
        ``(x[rP+j], x[rP+j+H])`` at ``r*H + j`` (the pairing of the PTX above), ``xs [M, K/P]``
        float32: the sum of the word's x values as rounded in xq."""
        m = tl.program_id(0)
        pr = tl.program_id(1)
        H: tl.constexpr = P0 // 2
        rows = K // P0
        rr = pr * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, H)
        mr = rr < rows
        base = x_ptr + m * stride_xm + rr[:, None] * P0 + j[None, :]
        lo = tl.load(base, mask=mr[:, None], other=0.0).to(tl.float16)
        hi = tl.load(base + H, mask=mr[:, None], other=0.0).to(tl.float16)
        xs = tl.sum(lo.to(tl.float32), 1) + tl.sum(hi.to(tl.float32), 1)
        tl.store(xs_ptr + m * rows + rr, xs, mask=mr)
        lo_b = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi_b = hi.to(tl.int16, bitcast=True).to(tl.int32)
        tl.store(xq_ptr + m * (K // 2) + rr[:, None] * H + j[None, :], (hi_b << 16) | lo_b, mask=mr[:, None])

    @triton.jit
    def _x_pair(xw_row, x_row, xq_row, rows, J: tl.constexpr, P0: tl.constexpr, XKIND: tl.constexpr,
                USE_ASM: tl.constexpr):
        """Pair J of the word rows ``rows [R]``: int32 f16x2 of ``(x[rows*P0 + J], x[rows*P0 + J + H])``
        (first value in the low half) and the float32 sum of the two values. XKIND 0/1: bf16/fp16 x
        read as int32 words (two values each; J and J + H have the same parity), 2: float32 x,
        3: pairs prepared by ``_prep_x_h2_kernel`` (the sum then comes from xs)."""
        H: tl.constexpr = P0 // 2
        if XKIND == 3:
            p = tl.load(xq_row + rows * H + J)
            ssum = tl.zeros(rows.shape, dtype=tl.float32)  # the sums come from xs
        else:
            if XKIND == 2:
                fa = tl.load(x_row + rows * P0 + J)
                fc = tl.load(x_row + rows * P0 + J + H)
            else:
                a = tl.load(xw_row + rows * H + J // 2)
                c = tl.load(xw_row + rows * H + (J + H) // 2)
                if XKIND == 0:
                    if J % 2 == 0:
                        fa = (a << 16).to(tl.float32, bitcast=True)
                        fc = (c << 16).to(tl.float32, bitcast=True)
                    else:
                        fa = (a & -65536).to(tl.float32, bitcast=True)
                        fc = (c & -65536).to(tl.float32, bitcast=True)
                else:
                    SH: tl.constexpr = 16 * (J % 2)
                    fa = ((a >> SH) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                    fc = ((c >> SH) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            if USE_ASM:
                p = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,f,f", [fc, fa],
                                              dtype=tl.int32, is_pure=True, pack=1)
            else:
                lo = fa.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
                p = (fc.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16) | lo
            ssum = fa + fc
        return p, ssum

    @triton.jit
    def _pair_dot_ref(w, p, J: tl.constexpr, W0: tl.constexpr, centre):
        """Plain-Triton twin of the PTX for one pair: ``[R, BLOCK_N]`` float32
        ``(x_lo (q_J - c) + x_hi (q_{J+H} - c)) 2^-S`` with x from the f16x2 pair p ``[R]`` and the
        centre c (C = 2^(b-1), or the zero point ``[R, BLOCK_N]`` with ZFOLD)."""
        MASK: tl.constexpr = (1 << W0) - 1
        S: tl.constexpr = 4 if W0 == 2 else 5 if W0 == 4 else 8
        xlo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xhi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        qlo = ((w >> (J * W0)) & MASK).to(tl.float32) - centre
        qhi = ((w >> (J * W0 + 16)) & MASK).to(tl.float32) - centre
        return (xlo[:, None] * qlo + xhi[:, None] * qhi) * (1.0 / (1 << S))

    @triton.jit
    def _half(t, HI: tl.constexpr):
        """float32 of the f16 in the low (HI False) or high half of int32 t."""
        h = (t >> 16) if HI else (t & 0xFFFF)
        return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _centre(t, W0: tl.constexpr, ZFOLD: tl.constexpr):
        """The code centre of the plain-Triton twin: C, or (ZFOLD) z from the table word t."""
        S: tl.constexpr = 4 if W0 == 2 else 5 if W0 == 4 else 8
        if ZFOLD:
            return -_half(t, True) * (1 << S)
        else:
            return (1 << (W0 - 1)) * 1.0

    @triton.jit
    def _finish(d, t, acc, ZFOLD: tl.constexpr):
        """Twin of the PTX tail: with ZFOLD ``acc + s d`` (s from the table word t), else d."""
        if ZFOLD:
            return acc + _half(t, False) * d
        else:
            return d

    @triton.jit
    def _dot_w8(w, xw_row, x_row, xq_row, rows, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr,
                ZFOLD: tl.constexpr):
        """One 8-bit word per element: (d ``[R, BLOCK_N]``, x sum ``[R]``); ZFOLD: (new acc, -)."""
        p0, s0 = _x_pair(xw_row, x_row, xq_row, rows, 0, 4, XKIND, USE_ASM)
        p1, s1 = _x_pair(xw_row, x_row, xq_row, rows, 1, 4, XKIND, USE_ASM)
        if USE_ASM:
            if ZFOLD:
                d = tl.inline_asm_elementwise(_ASMZ_H2_W8_1, "=f,r,r,r,r,f",
                                              [w, p0[:, None], p1[:, None], t, acc],
                                              dtype=tl.float32, is_pure=True, pack=1)
            else:
                d = tl.inline_asm_elementwise(_ASM_H2_W8_1, "=f,r,r,r", [w, p0[:, None], p1[:, None]],
                                              dtype=tl.float32, is_pure=True, pack=1)
        else:
            c = _centre(t, 8, ZFOLD)
            d = _finish(_pair_dot_ref(w, p0, 0, 8, c) + _pair_dot_ref(w, p1, 1, 8, c), t, acc, ZFOLD)
        return d, s0 + s1

    @triton.jit
    def _dot_w8x2(wa, wb, xw_row, x_row, xq_row, ra, rb, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr,
                  ZFOLD: tl.constexpr):
        """Two 8-bit words per element (one f16 lane sum)."""
        a0, s0 = _x_pair(xw_row, x_row, xq_row, ra, 0, 4, XKIND, USE_ASM)
        a1, s1 = _x_pair(xw_row, x_row, xq_row, ra, 1, 4, XKIND, USE_ASM)
        b0, s2 = _x_pair(xw_row, x_row, xq_row, rb, 0, 4, XKIND, USE_ASM)
        b1, s3 = _x_pair(xw_row, x_row, xq_row, rb, 1, 4, XKIND, USE_ASM)
        if USE_ASM:
            if ZFOLD:
                d = tl.inline_asm_elementwise(
                    _ASMZ_H2_W8_2, "=f" + ",r" * 7 + ",f",
                    [wa, wb, a0[:, None], a1[:, None], b0[:, None], b1[:, None], t, acc],
                    dtype=tl.float32, is_pure=True, pack=1)
            else:
                d = tl.inline_asm_elementwise(_ASM_H2_W8_2, "=f" + ",r" * 6,
                                              [wa, wb, a0[:, None], a1[:, None], b0[:, None], b1[:, None]],
                                              dtype=tl.float32, is_pure=True, pack=1)
        else:
            c = _centre(t, 8, ZFOLD)
            d = _finish(_pair_dot_ref(wa, a0, 0, 8, c) + _pair_dot_ref(wa, a1, 1, 8, c)
                        + _pair_dot_ref(wb, b0, 0, 8, c) + _pair_dot_ref(wb, b1, 1, 8, c), t, acc, ZFOLD)
        return d, (s0 + s1) + (s2 + s3)

    @triton.jit
    def _dot_w4(w, xw_row, x_row, xq_row, rows, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr,
                ZFOLD: tl.constexpr):
        p0, s0 = _x_pair(xw_row, x_row, xq_row, rows, 0, 8, XKIND, USE_ASM)
        p1, s1 = _x_pair(xw_row, x_row, xq_row, rows, 1, 8, XKIND, USE_ASM)
        p2, s2 = _x_pair(xw_row, x_row, xq_row, rows, 2, 8, XKIND, USE_ASM)
        p3, s3 = _x_pair(xw_row, x_row, xq_row, rows, 3, 8, XKIND, USE_ASM)
        if USE_ASM:
            if ZFOLD:
                d = tl.inline_asm_elementwise(_ASMZ_H2_W4_1, "=f" + ",r" * 6 + ",f",
                                              [w, p0[:, None], p1[:, None], p2[:, None], p3[:, None], t, acc],
                                              dtype=tl.float32, is_pure=True, pack=1)
            else:
                d = tl.inline_asm_elementwise(_ASM_H2_W4_1, "=f" + ",r" * 5,
                                              [w, p0[:, None], p1[:, None], p2[:, None], p3[:, None]],
                                              dtype=tl.float32, is_pure=True, pack=1)
        else:
            c = _centre(t, 4, ZFOLD)
            d = _finish(_pair_dot_ref(w, p0, 0, 4, c) + _pair_dot_ref(w, p1, 1, 4, c)
                        + _pair_dot_ref(w, p2, 2, 4, c) + _pair_dot_ref(w, p3, 3, 4, c), t, acc, ZFOLD)
        return d, (s0 + s1) + (s2 + s3)

    @triton.jit
    def _dot_w4x2(wa, wb, xw_row, x_row, xq_row, ra, rb, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr,
                  ZFOLD: tl.constexpr):
        a0, s0 = _x_pair(xw_row, x_row, xq_row, ra, 0, 8, XKIND, USE_ASM)
        a1, s1 = _x_pair(xw_row, x_row, xq_row, ra, 1, 8, XKIND, USE_ASM)
        a2, s2 = _x_pair(xw_row, x_row, xq_row, ra, 2, 8, XKIND, USE_ASM)
        a3, s3 = _x_pair(xw_row, x_row, xq_row, ra, 3, 8, XKIND, USE_ASM)
        b0, t0 = _x_pair(xw_row, x_row, xq_row, rb, 0, 8, XKIND, USE_ASM)
        b1, t1 = _x_pair(xw_row, x_row, xq_row, rb, 1, 8, XKIND, USE_ASM)
        b2, t2 = _x_pair(xw_row, x_row, xq_row, rb, 2, 8, XKIND, USE_ASM)
        b3, t3 = _x_pair(xw_row, x_row, xq_row, rb, 3, 8, XKIND, USE_ASM)
        if USE_ASM:
            if ZFOLD:
                d = tl.inline_asm_elementwise(
                    _ASMZ_H2_W4_2, "=f" + ",r" * 11 + ",f",
                    [wa, wb, a0[:, None], a1[:, None], a2[:, None], a3[:, None], b0[:, None], b1[:, None],
                     b2[:, None], b3[:, None], t, acc], dtype=tl.float32, is_pure=True, pack=1)
            else:
                d = tl.inline_asm_elementwise(
                    _ASM_H2_W4_2, "=f" + ",r" * 10,
                    [wa, wb, a0[:, None], a1[:, None], a2[:, None], a3[:, None], b0[:, None], b1[:, None],
                     b2[:, None], b3[:, None]], dtype=tl.float32, is_pure=True, pack=1)
        else:
            c = _centre(t, 4, ZFOLD)
            d = _finish(_pair_dot_ref(wa, a0, 0, 4, c) + _pair_dot_ref(wa, a1, 1, 4, c)
                        + _pair_dot_ref(wa, a2, 2, 4, c) + _pair_dot_ref(wa, a3, 3, 4, c)
                        + _pair_dot_ref(wb, b0, 0, 4, c) + _pair_dot_ref(wb, b1, 1, 4, c)
                        + _pair_dot_ref(wb, b2, 2, 4, c) + _pair_dot_ref(wb, b3, 3, 4, c), t, acc, ZFOLD)
        return d, ((s0 + s1) + (s2 + s3)) + ((t0 + t1) + (t2 + t3))

    @triton.jit
    def _dot_w2(w, xw_row, x_row, xq_row, rows, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr,
                ZFOLD: tl.constexpr):
        p0, s0 = _x_pair(xw_row, x_row, xq_row, rows, 0, 16, XKIND, USE_ASM)
        p1, s1 = _x_pair(xw_row, x_row, xq_row, rows, 1, 16, XKIND, USE_ASM)
        p2, s2 = _x_pair(xw_row, x_row, xq_row, rows, 2, 16, XKIND, USE_ASM)
        p3, s3 = _x_pair(xw_row, x_row, xq_row, rows, 3, 16, XKIND, USE_ASM)
        p4, s4 = _x_pair(xw_row, x_row, xq_row, rows, 4, 16, XKIND, USE_ASM)
        p5, s5 = _x_pair(xw_row, x_row, xq_row, rows, 5, 16, XKIND, USE_ASM)
        p6, s6 = _x_pair(xw_row, x_row, xq_row, rows, 6, 16, XKIND, USE_ASM)
        p7, s7 = _x_pair(xw_row, x_row, xq_row, rows, 7, 16, XKIND, USE_ASM)
        if USE_ASM:
            if ZFOLD:
                d = tl.inline_asm_elementwise(
                    _ASMZ_H2_W2_1, "=f" + ",r" * 10 + ",f",
                    [w, p0[:, None], p1[:, None], p2[:, None], p3[:, None], p4[:, None], p5[:, None],
                     p6[:, None], p7[:, None], t, acc], dtype=tl.float32, is_pure=True, pack=1)
            else:
                d = tl.inline_asm_elementwise(
                    _ASM_H2_W2_1, "=f" + ",r" * 9,
                    [w, p0[:, None], p1[:, None], p2[:, None], p3[:, None], p4[:, None], p5[:, None],
                     p6[:, None], p7[:, None]], dtype=tl.float32, is_pure=True, pack=1)
        else:
            c = _centre(t, 2, ZFOLD)
            d = _finish(_pair_dot_ref(w, p0, 0, 2, c) + _pair_dot_ref(w, p1, 1, 2, c)
                        + _pair_dot_ref(w, p2, 2, 2, c) + _pair_dot_ref(w, p3, 3, 2, c)
                        + _pair_dot_ref(w, p4, 4, 2, c) + _pair_dot_ref(w, p5, 5, 2, c)
                        + _pair_dot_ref(w, p6, 6, 2, c) + _pair_dot_ref(w, p7, 7, 2, c), t, acc, ZFOLD)
        return d, ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))

    @triton.jit
    def _word_dot_h2(wa, wb, xw_row, x_row, xq_row, ra, rb, t, acc, W0: tl.constexpr, WPT: tl.constexpr,
                     XKIND: tl.constexpr, USE_ASM: tl.constexpr, ZFOLD: tl.constexpr):
        """(``[R', BLOCK_N]`` float32 ``sum x (q - C) 2^-S`` over the codes of word wa (and wb when
        WPT == 2), ``[R']`` sums of the x values); ra/rb ``[R']`` are the word rows of wa/wb. 2-bit
        words go one per PTX block (16 codes: 8 products per f16 lane already). ZFOLD: the first
        result is ``acc + s sum x (q - z) 2^-S`` (t: the columns' table words ``[R', BLOCK_N]``)."""
        if W0 == 8:
            if WPT == 2:
                d, xs = _dot_w8x2(wa, wb, xw_row, x_row, xq_row, ra, rb, t, acc, XKIND, USE_ASM, ZFOLD)
            else:
                d, xs = _dot_w8(wa, xw_row, x_row, xq_row, ra, t, acc, XKIND, USE_ASM, ZFOLD)
        elif W0 == 4:
            if WPT == 2:
                d, xs = _dot_w4x2(wa, wb, xw_row, x_row, xq_row, ra, rb, t, acc, XKIND, USE_ASM, ZFOLD)
            else:
                d, xs = _dot_w4(wa, xw_row, x_row, xq_row, ra, t, acc, XKIND, USE_ASM, ZFOLD)
        else:
            d, xs = _dot_w2(wa, xw_row, x_row, xq_row, ra, t, acc, XKIND, USE_ASM, ZFOLD)
            if WPT == 2:
                if ZFOLD:
                    d, xs2 = _dot_w2(wb, xw_row, x_row, xq_row, rb, t, d, XKIND, USE_ASM, ZFOLD)
                else:
                    d2, xs2 = _dot_w2(wb, xw_row, x_row, xq_row, rb, t, acc, XKIND, USE_ASM, ZFOLD)
                    d += d2
                xs += xs2
        return d, xs

    @triton.jit
    def _quant_gemv_h2_kernel(x_ptr, xq_ptr, xs_ptr, q_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G,
                              stride_xm, stride_qk, stride_sg, stride_ym, k_per_split, n_iters, zero,
                              W0: tl.constexpr, XSCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ITERS: tl.constexpr,
                              USE_ASM: tl.constexpr, WPT: tl.constexpr, XKIND: tl.constexpr,
                              PDL: tl.constexpr = False, STAGES: tl.constexpr = 1,
                              EVEN_N: tl.constexpr = False, ZFOLD: tl.constexpr = False,
                              ACC: tl.constexpr = False, DEFER: tl.constexpr = False):
        """One row m, BLOCK_N columns, one K split, single-slice uniform W0 in {2, 4, 8}:
        ``y = sum_tiles s * (2^S * sum x (q - C) 2^-S - (z - C) * sum x)`` with the word dot of
        ``_word_dot_h2``. The tile's R = BLOCK_K / P word rows are loaded as WPT slabs of R / WPT
        rows (one PTX block takes one word of each slab); the next tile is loaded before the
        current one is used; g (scale group) is advanced by a counter, no division in the loop;
        split-K partials are summed by the last program of a column tile (DEFER: by split_k_sum.py's
        kernel after this one). x: ``x_ptr`` (XKIND
        0/1: the same memory as int32 words, stride in words; 2: float32) or the prepared
        ``xq_ptr``/``xs_ptr`` (XKIND 3). PDL: the first weight tile is requested before waiting
        for the kernel that writes x (anybit/kernels/pdl.py). ZFOLD (integer zero points): s_ptr is
        the ``gemv_table`` of the weight and ``y = 2^S sum_tiles s sum x (q - z) 2^-S``, the zero
        folded into the code conversion (no x sums, one FFMA per element inside the PTX)."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        P0: tl.constexpr = 32 // W0
        RH: tl.constexpr = BLOCK_K // P0 // WPT
        C: tl.constexpr = 1 << (W0 - 1)
        r = tl.arange(0, RH)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros([RH, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        x_row = x_ptr + m * stride_xm
        xq_row = xq_ptr + m * (K // 2)
        xs_row = xs_ptr + m * (K // P0)
        n = ITERS if ITERS > 0 else n_iters
        if EVEN_N:  # N % BLOCK_N == 0: no column mask (an all-true mask folds away)
            mask_n = tl.full([BLOCK_N], 1, tl.int1)
        mask2 = mask_n[None, :]
        wp = q_ptr + (k_start // P0 + r)[:, None] * stride_qk + offs_n[None, :]
        step = (BLOCK_K // P0) * stride_qk
        nwa = tl.zeros([RH, BLOCK_N], dtype=tl.int32)
        nwb = nwa
        if STAGES == 1:
            nwa = tl.load(wp, mask=mask2, other=0)
            nwb = nwa
            if WPT == 2:
                nwb = tl.load(wp + RH * stride_qk, mask=mask2, other=0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # scales/zeros as [RH, BLOCK_N] rows of one address (run-time row stride ``zero`` = 0): the
        # same layout as the words, so the x chain is not computed a second time in the layout
        # Triton would pick for a [1, BLOCK_N] load (repeated rows are L1 hits)
        sz_off = (r * zero)[:, None] + offs_n[None, :]
        tpg = G // BLOCK_K
        g = k_start // G
        t = (k_start // BLOCK_K) % tpg
        for i in tl.range(0, n, num_stages=STAGES):
            k0 = k_start + i * BLOCK_K
            if STAGES == 1:
                wa = nwa
                wb = nwb
                wp += tl.where(i + 1 < n, step, 0)  # prefetch (the last one repeats)
                nwa = tl.load(wp, mask=mask2, other=0)
                if WPT == 2:
                    nwb = tl.load(wp + RH * stride_qk, mask=mask2, other=0)
            else:  # Triton's pipeliner keeps STAGES - 1 tiles in flight (cp.async to shared memory)
                wpi = wp + i * step
                wa = tl.load(wpi, mask=mask2, other=0)
                wb = wa
                if WPT == 2:
                    wb = tl.load(wpi + RH * stride_qk, mask=mask2, other=0)
            rows = k0 // P0 + r
            if ZFOLD:  # s_ptr: the int32 table of gemv_table (f16 s | f16 -z 2^-S)
                tw = tl.load(s_ptr + g * stride_sg + sz_off, mask=mask2, other=0)
                acc, xs = _word_dot_h2(wa, wb, x_row, x_row, xq_row, rows, rows + RH, tw, acc, W0, WPT, XKIND,
                                       USE_ASM, True)
            else:
                s = tl.load(s_ptr + g * stride_sg + sz_off, mask=mask2, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g * stride_sg + sz_off, mask=mask2, other=0.0).to(tl.float32)
                d, xs = _word_dot_h2(wa, wb, x_row, x_row, xq_row, rows, rows + RH, s, acc, W0, WPT, XKIND,
                                     USE_ASM, False)
                if XKIND == 3:
                    xs = tl.load(xs_row + rows)
                    if WPT == 2:
                        xs += tl.load(xs_row + rows + RH)
                acc += (s * XSCALE) * d  # two FFMA per element
                acc -= (s * (z - C)) * xs[:, None]
            t += 1
            g += tl.where(t == tpg, 1, 0)
            t = tl.where(t == tpg, 0, t)
        out = tl.sum(acc, axis=0)
        if ZFOLD:
            out = out * XSCALE
        _store_row_split_k(out, y_ptr, ws_ptr, lock_ptr, m, pid_n, pid_k, M, N, offs_n,
                           mask_n, stride_ym, SPLIT_K, BLOCK_N, ACC, DEFER)


    # ---- two-slice widths (3 = 2+1, 5 = 4+1, 6 = 4+2), folded zero only: see _h2s_asm ------------
    _ASMS_H2_W3_1: tl.constexpr = tl.constexpr(_h2s_asm(3, 1))
    _ASMS_H2_W3_2: tl.constexpr = tl.constexpr(_h2s_asm(3, 2))
    _ASMS_H2_W5_1: tl.constexpr = tl.constexpr(_h2s_asm(5, 1))
    _ASMS_H2_W5_2: tl.constexpr = tl.constexpr(_h2s_asm(5, 2))
    _ASMS_H2_W6_1: tl.constexpr = tl.constexpr(_h2s_asm(6, 1))
    _ASMS_H2_W6_2: tl.constexpr = tl.constexpr(_h2s_asm(6, 2))

    @triton.jit
    def _xp4(x_row, rows, J0: tl.constexpr, P0: tl.constexpr, XKIND: tl.constexpr, USE_ASM: tl.constexpr):
        """x pairs J0..J0+3 of the slice-0 word rows ``rows [R]`` (``_x_pair``; XKIND 0/1/2)."""
        p0, s0 = _x_pair(x_row, x_row, x_row, rows, J0, P0, XKIND, USE_ASM)
        p1, s1 = _x_pair(x_row, x_row, x_row, rows, J0 + 1, P0, XKIND, USE_ASM)
        p2, s2 = _x_pair(x_row, x_row, x_row, rows, J0 + 2, P0, XKIND, USE_ASM)
        p3, s3 = _x_pair(x_row, x_row, x_row, rows, J0 + 3, P0, XKIND, USE_ASM)
        return p0, p1, p2, p3

    @triton.jit
    def _pair_dot_s(w, v, p, I: tl.constexpr, J: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, z):
        """Plain-Triton twin of one pair of slice-0 word I of a two-slice block: ``[R, BLOCK_N]``
        float32 ``x_lo (q_J - z) + x_hi (q_{J+H0} - z)``, q = q0 + 2^W0 q1 (q1 from the slice-1
        word v at code index I * P0 + J of the block)."""
        P0: tl.constexpr = 32 // W0
        H0: tl.constexpr = P0 // 2
        M0: tl.constexpr = (1 << W0) - 1
        M1: tl.constexpr = (1 << W1) - 1
        xlo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xhi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        qlo = ((w >> (J * W0)) & M0) | (((v >> ((I * P0 + J) * W1)) & M1) << W0)
        qhi = ((w >> ((J + H0) * W0)) & M0) | (((v >> ((I * P0 + J + H0) * W1)) & M1) << W0)
        return xlo[:, None] * (qlo.to(tl.float32) - z) + xhi[:, None] * (qhi.to(tl.float32) - z)

    @triton.jit
    def _tw4(w, v, p0, p1, p2, p3, I: tl.constexpr, J0: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, z):
        return ((_pair_dot_s(w, v, p0, I, J0, W0, W1, z) + _pair_dot_s(w, v, p1, I, J0 + 1, W0, W1, z))
                + (_pair_dot_s(w, v, p2, I, J0 + 2, W0, W1, z) + _pair_dot_s(w, v, p3, I, J0 + 3, W0, W1, z)))

    @triton.jit
    def _dot_s3_1(w0, w1, v0, x_row, ra, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr):
        """3 bits: 1 slice-1 word(s) and their 2 slice-0 words (rows ra .. ra + 1)."""
        p0_0, p0_1, p0_2, p0_3 = _xp4(x_row, ra, 0, 16, XKIND, USE_ASM)
        p0_4, p0_5, p0_6, p0_7 = _xp4(x_row, ra, 4, 16, XKIND, USE_ASM)
        p1_0, p1_1, p1_2, p1_3 = _xp4(x_row, ra + 1, 0, 16, XKIND, USE_ASM)
        p1_4, p1_5, p1_6, p1_7 = _xp4(x_row, ra + 1, 4, 16, XKIND, USE_ASM)
        if USE_ASM:
            d = tl.inline_asm_elementwise(
                _ASMS_H2_W3_1, "=f" + ",r" * 20 + ",f",
                [w0, w1, v0, p0_0[:, None], p0_1[:, None], p0_2[:, None], p0_3[:, None], p0_4[:, None],
                 p0_5[:, None], p0_6[:, None], p0_7[:, None], p1_0[:, None], p1_1[:, None], p1_2[:, None],
                 p1_3[:, None], p1_4[:, None], p1_5[:, None], p1_6[:, None], p1_7[:, None], t, acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            z = -_half(t, True) * 64.0
            d = _tw4(w0, v0, p0_0, p0_1, p0_2, p0_3, 0, 0, 2, 1, z)
            d += _tw4(w0, v0, p0_4, p0_5, p0_6, p0_7, 0, 4, 2, 1, z)
            d += _tw4(w1, v0, p1_0, p1_1, p1_2, p1_3, 1, 0, 2, 1, z)
            d += _tw4(w1, v0, p1_4, p1_5, p1_6, p1_7, 1, 4, 2, 1, z)
            d = acc + _half(t, False) * (d * (1.0 / 64))
        return d

    @triton.jit
    def _dot_s3_2(w0, w1, w2, w3, v0, v1, x_row, ra, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr):
        """3 bits: 2 slice-1 word(s) and their 4 slice-0 words (rows ra .. ra + 3)."""
        p0_0, p0_1, p0_2, p0_3 = _xp4(x_row, ra, 0, 16, XKIND, USE_ASM)
        p0_4, p0_5, p0_6, p0_7 = _xp4(x_row, ra, 4, 16, XKIND, USE_ASM)
        p1_0, p1_1, p1_2, p1_3 = _xp4(x_row, ra + 1, 0, 16, XKIND, USE_ASM)
        p1_4, p1_5, p1_6, p1_7 = _xp4(x_row, ra + 1, 4, 16, XKIND, USE_ASM)
        p2_0, p2_1, p2_2, p2_3 = _xp4(x_row, ra + 2, 0, 16, XKIND, USE_ASM)
        p2_4, p2_5, p2_6, p2_7 = _xp4(x_row, ra + 2, 4, 16, XKIND, USE_ASM)
        p3_0, p3_1, p3_2, p3_3 = _xp4(x_row, ra + 3, 0, 16, XKIND, USE_ASM)
        p3_4, p3_5, p3_6, p3_7 = _xp4(x_row, ra + 3, 4, 16, XKIND, USE_ASM)
        if USE_ASM:
            d = tl.inline_asm_elementwise(
                _ASMS_H2_W3_2, "=f" + ",r" * 39 + ",f",
                [w0, w1, w2, w3, v0, v1, p0_0[:, None], p0_1[:, None], p0_2[:, None], p0_3[:, None],
                 p0_4[:, None], p0_5[:, None], p0_6[:, None], p0_7[:, None], p1_0[:, None], p1_1[:, None],
                 p1_2[:, None], p1_3[:, None], p1_4[:, None], p1_5[:, None], p1_6[:, None], p1_7[:, None],
                 p2_0[:, None], p2_1[:, None], p2_2[:, None], p2_3[:, None], p2_4[:, None], p2_5[:, None],
                 p2_6[:, None], p2_7[:, None], p3_0[:, None], p3_1[:, None], p3_2[:, None], p3_3[:, None],
                 p3_4[:, None], p3_5[:, None], p3_6[:, None], p3_7[:, None], t, acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            z = -_half(t, True) * 64.0
            d = _tw4(w0, v0, p0_0, p0_1, p0_2, p0_3, 0, 0, 2, 1, z)
            d += _tw4(w0, v0, p0_4, p0_5, p0_6, p0_7, 0, 4, 2, 1, z)
            d += _tw4(w1, v0, p1_0, p1_1, p1_2, p1_3, 1, 0, 2, 1, z)
            d += _tw4(w1, v0, p1_4, p1_5, p1_6, p1_7, 1, 4, 2, 1, z)
            d += _tw4(w2, v1, p2_0, p2_1, p2_2, p2_3, 0, 0, 2, 1, z)
            d += _tw4(w2, v1, p2_4, p2_5, p2_6, p2_7, 0, 4, 2, 1, z)
            d += _tw4(w3, v1, p3_0, p3_1, p3_2, p3_3, 1, 0, 2, 1, z)
            d += _tw4(w3, v1, p3_4, p3_5, p3_6, p3_7, 1, 4, 2, 1, z)
            d = acc + _half(t, False) * (d * (1.0 / 64))
        return d

    @triton.jit
    def _dot_s5_1(w0, w1, w2, w3, v0, x_row, ra, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr):
        """5 bits: 1 slice-1 word(s) and their 4 slice-0 words (rows ra .. ra + 3)."""
        p0_0, p0_1, p0_2, p0_3 = _xp4(x_row, ra, 0, 8, XKIND, USE_ASM)
        p1_0, p1_1, p1_2, p1_3 = _xp4(x_row, ra + 1, 0, 8, XKIND, USE_ASM)
        p2_0, p2_1, p2_2, p2_3 = _xp4(x_row, ra + 2, 0, 8, XKIND, USE_ASM)
        p3_0, p3_1, p3_2, p3_3 = _xp4(x_row, ra + 3, 0, 8, XKIND, USE_ASM)
        if USE_ASM:
            d = tl.inline_asm_elementwise(
                _ASMS_H2_W5_1, "=f" + ",r" * 22 + ",f",
                [w0, w1, w2, w3, v0, p0_0[:, None], p0_1[:, None], p0_2[:, None], p0_3[:, None],
                 p1_0[:, None], p1_1[:, None], p1_2[:, None], p1_3[:, None], p2_0[:, None], p2_1[:, None],
                 p2_2[:, None], p2_3[:, None], p3_0[:, None], p3_1[:, None], p3_2[:, None], p3_3[:, None],
                 t, acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            z = -_half(t, True) * 256.0
            d = _tw4(w0, v0, p0_0, p0_1, p0_2, p0_3, 0, 0, 4, 1, z)
            d += _tw4(w1, v0, p1_0, p1_1, p1_2, p1_3, 1, 0, 4, 1, z)
            d += _tw4(w2, v0, p2_0, p2_1, p2_2, p2_3, 2, 0, 4, 1, z)
            d += _tw4(w3, v0, p3_0, p3_1, p3_2, p3_3, 3, 0, 4, 1, z)
            d = acc + _half(t, False) * (d * (1.0 / 256))
        return d

    @triton.jit
    def _dot_s5_2(w0, w1, w2, w3, w4, w5, w6, w7, v0, v1, x_row, ra, t, acc,
                  XKIND: tl.constexpr, USE_ASM: tl.constexpr):
        """5 bits: 2 slice-1 word(s) and their 8 slice-0 words (rows ra .. ra + 7)."""
        p0_0, p0_1, p0_2, p0_3 = _xp4(x_row, ra, 0, 8, XKIND, USE_ASM)
        p1_0, p1_1, p1_2, p1_3 = _xp4(x_row, ra + 1, 0, 8, XKIND, USE_ASM)
        p2_0, p2_1, p2_2, p2_3 = _xp4(x_row, ra + 2, 0, 8, XKIND, USE_ASM)
        p3_0, p3_1, p3_2, p3_3 = _xp4(x_row, ra + 3, 0, 8, XKIND, USE_ASM)
        p4_0, p4_1, p4_2, p4_3 = _xp4(x_row, ra + 4, 0, 8, XKIND, USE_ASM)
        p5_0, p5_1, p5_2, p5_3 = _xp4(x_row, ra + 5, 0, 8, XKIND, USE_ASM)
        p6_0, p6_1, p6_2, p6_3 = _xp4(x_row, ra + 6, 0, 8, XKIND, USE_ASM)
        p7_0, p7_1, p7_2, p7_3 = _xp4(x_row, ra + 7, 0, 8, XKIND, USE_ASM)
        if USE_ASM:
            d = tl.inline_asm_elementwise(
                _ASMS_H2_W5_2, "=f" + ",r" * 43 + ",f",
                [w0, w1, w2, w3, w4, w5, w6, w7, v0, v1, p0_0[:, None], p0_1[:, None], p0_2[:, None],
                 p0_3[:, None], p1_0[:, None], p1_1[:, None], p1_2[:, None], p1_3[:, None], p2_0[:, None],
                 p2_1[:, None], p2_2[:, None], p2_3[:, None], p3_0[:, None], p3_1[:, None], p3_2[:, None],
                 p3_3[:, None], p4_0[:, None], p4_1[:, None], p4_2[:, None], p4_3[:, None], p5_0[:, None],
                 p5_1[:, None], p5_2[:, None], p5_3[:, None], p6_0[:, None], p6_1[:, None], p6_2[:, None],
                 p6_3[:, None], p7_0[:, None], p7_1[:, None], p7_2[:, None], p7_3[:, None], t, acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            z = -_half(t, True) * 256.0
            d = _tw4(w0, v0, p0_0, p0_1, p0_2, p0_3, 0, 0, 4, 1, z)
            d += _tw4(w1, v0, p1_0, p1_1, p1_2, p1_3, 1, 0, 4, 1, z)
            d += _tw4(w2, v0, p2_0, p2_1, p2_2, p2_3, 2, 0, 4, 1, z)
            d += _tw4(w3, v0, p3_0, p3_1, p3_2, p3_3, 3, 0, 4, 1, z)
            d += _tw4(w4, v1, p4_0, p4_1, p4_2, p4_3, 0, 0, 4, 1, z)
            d += _tw4(w5, v1, p5_0, p5_1, p5_2, p5_3, 1, 0, 4, 1, z)
            d += _tw4(w6, v1, p6_0, p6_1, p6_2, p6_3, 2, 0, 4, 1, z)
            d += _tw4(w7, v1, p7_0, p7_1, p7_2, p7_3, 3, 0, 4, 1, z)
            d = acc + _half(t, False) * (d * (1.0 / 256))
        return d

    @triton.jit
    def _dot_s6_1(w0, w1, v0, x_row, ra, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr):
        """6 bits: 1 slice-1 word(s) and their 2 slice-0 words (rows ra .. ra + 1)."""
        p0_0, p0_1, p0_2, p0_3 = _xp4(x_row, ra, 0, 8, XKIND, USE_ASM)
        p1_0, p1_1, p1_2, p1_3 = _xp4(x_row, ra + 1, 0, 8, XKIND, USE_ASM)
        if USE_ASM:
            d = tl.inline_asm_elementwise(
                _ASMS_H2_W6_1, "=f" + ",r" * 12 + ",f",
                [w0, w1, v0, p0_0[:, None], p0_1[:, None], p0_2[:, None], p0_3[:, None], p1_0[:, None],
                 p1_1[:, None], p1_2[:, None], p1_3[:, None], t, acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            z = -_half(t, True) * 256.0
            d = _tw4(w0, v0, p0_0, p0_1, p0_2, p0_3, 0, 0, 4, 2, z)
            d += _tw4(w1, v0, p1_0, p1_1, p1_2, p1_3, 1, 0, 4, 2, z)
            d = acc + _half(t, False) * (d * (1.0 / 256))
        return d

    @triton.jit
    def _dot_s6_2(w0, w1, w2, w3, v0, v1, x_row, ra, t, acc, XKIND: tl.constexpr, USE_ASM: tl.constexpr):
        """6 bits: 2 slice-1 word(s) and their 4 slice-0 words (rows ra .. ra + 3)."""
        p0_0, p0_1, p0_2, p0_3 = _xp4(x_row, ra, 0, 8, XKIND, USE_ASM)
        p1_0, p1_1, p1_2, p1_3 = _xp4(x_row, ra + 1, 0, 8, XKIND, USE_ASM)
        p2_0, p2_1, p2_2, p2_3 = _xp4(x_row, ra + 2, 0, 8, XKIND, USE_ASM)
        p3_0, p3_1, p3_2, p3_3 = _xp4(x_row, ra + 3, 0, 8, XKIND, USE_ASM)
        if USE_ASM:
            d = tl.inline_asm_elementwise(
                _ASMS_H2_W6_2, "=f" + ",r" * 23 + ",f",
                [w0, w1, w2, w3, v0, v1, p0_0[:, None], p0_1[:, None], p0_2[:, None], p0_3[:, None],
                 p1_0[:, None], p1_1[:, None], p1_2[:, None], p1_3[:, None], p2_0[:, None], p2_1[:, None],
                 p2_2[:, None], p2_3[:, None], p3_0[:, None], p3_1[:, None], p3_2[:, None], p3_3[:, None],
                 t, acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            z = -_half(t, True) * 256.0
            d = _tw4(w0, v0, p0_0, p0_1, p0_2, p0_3, 0, 0, 4, 2, z)
            d += _tw4(w1, v0, p1_0, p1_1, p1_2, p1_3, 1, 0, 4, 2, z)
            d += _tw4(w2, v1, p2_0, p2_1, p2_2, p2_3, 0, 0, 4, 2, z)
            d += _tw4(w3, v1, p3_0, p3_1, p3_2, p3_3, 1, 0, 4, 2, z)
            d = acc + _half(t, False) * (d * (1.0 / 256))
        return d

    @triton.jit
    def _slabs(wp, vp, stride_qk, mask2, NS: tl.constexpr, NV: tl.constexpr):
        """The tile's NS slice-0 slabs (rows wp + i stride, i < NS) and NV slice-1 slabs (vp + j
        stride): 8 + 2 ``[R, BLOCK_N]`` int32 (the unused ones repeat the first)."""
        a0 = tl.load(wp, mask=mask2, other=0)
        a1 = tl.load(wp + stride_qk, mask=mask2, other=0)
        a2 = a0
        a3 = a0
        a4 = a0
        a5 = a0
        a6 = a0
        a7 = a0
        if NS >= 4:
            a2 = tl.load(wp + 2 * stride_qk, mask=mask2, other=0)
            a3 = tl.load(wp + 3 * stride_qk, mask=mask2, other=0)
        if NS == 8:
            a4 = tl.load(wp + 4 * stride_qk, mask=mask2, other=0)
            a5 = tl.load(wp + 5 * stride_qk, mask=mask2, other=0)
            a6 = tl.load(wp + 6 * stride_qk, mask=mask2, other=0)
            a7 = tl.load(wp + 7 * stride_qk, mask=mask2, other=0)
        v0 = tl.load(vp, mask=mask2, other=0)
        v1 = v0
        if NV == 2:
            v1 = tl.load(vp + stride_qk, mask=mask2, other=0)
        return a0, a1, a2, a3, a4, a5, a6, a7, v0, v1

    @triton.jit
    def _quant_gemv_h2s_kernel(x_ptr, q_ptr, t_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G, stride_xm, stride_qk,
                               stride_tg, stride_ym, k_per_split, n_iters, zero, BITS: tl.constexpr,
                               XSCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               SPLIT_K: tl.constexpr, ITERS: tl.constexpr, USE_ASM: tl.constexpr,
                               XKIND: tl.constexpr, NV: tl.constexpr = 2, PDL: tl.constexpr = False,
                               EVEN_N: tl.constexpr = False, ACC: tl.constexpr = False,
                               DEFER: tl.constexpr = False):
        """Two-slice twin of ``_quant_gemv_h2_kernel`` (folded zero, register prefetch): one row m,
        BLOCK_N columns, one K split; ``y = 2^S sum_tiles s sum x (q - z) 2^-S`` (t_ptr: the
        ``gemv_table``). A tile's BLOCK_K / P1 slice-1 word rows are loaded as NV slabs
        ``[RH, BLOCK_N]`` (slab j: rows NV r + j) and its slice-0 rows as NS = NV w0 / w1 slabs
        (slab i: rows NS r + i), so element (r, n) of slice-0 slab i lies under element (r, n) of
        slice-1 slab i // (w0 / w1) and one PTX block (``_h2s_asm``) takes one word of each slab.
        The next tile is loaded before the current one is used."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        W0: tl.constexpr = 2 if BITS == 3 else 4
        W1: tl.constexpr = BITS - W0
        P0: tl.constexpr = 32 // W0
        P1: tl.constexpr = 32 // W1
        NS: tl.constexpr = NV * (W0 // W1)
        RH: tl.constexpr = BLOCK_K // P1 // NV
        r = tl.arange(0, RH)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if EVEN_N:
            mask_n = tl.full([BLOCK_N], 1, tl.int1)
        mask2 = mask_n[None, :]
        acc = tl.zeros([RH, BLOCK_N], dtype=tl.float32)
        k_start = pid_k * k_per_split
        x_row = x_ptr + m * stride_xm
        n = ITERS if ITERS > 0 else n_iters
        wp = q_ptr + (k_start // P0 + NS * r)[:, None] * stride_qk + offs_n[None, :]
        vp = q_ptr + (K // P0 + k_start // P1 + NV * r)[:, None] * stride_qk + offs_n[None, :]
        step0 = (BLOCK_K // P0) * stride_qk
        step1 = (BLOCK_K // P1) * stride_qk
        n0, n1, n2, n3, n4, n5, n6, n7, nv0, nv1 = _slabs(wp, vp, stride_qk, mask2, NS, NV)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t_off = (r * zero)[:, None] + offs_n[None, :]  # table rows of one address (see _quant_gemv_h2_kernel)
        tpg = G // BLOCK_K
        g = k_start // G
        tt = (k_start // BLOCK_K) % tpg
        for i in tl.range(0, n, num_stages=1):
            k0 = k_start + i * BLOCK_K
            w0, w1, w2, w3, w4, w5, w6, w7, v0, v1 = n0, n1, n2, n3, n4, n5, n6, n7, nv0, nv1
            more = i + 1 < n
            wp += tl.where(more, step0, 0)  # prefetch (the last one repeats)
            vp += tl.where(more, step1, 0)
            n0, n1, n2, n3, n4, n5, n6, n7, nv0, nv1 = _slabs(wp, vp, stride_qk, mask2, NS, NV)
            rows = k0 // P0 + NS * r
            tw = tl.load(t_ptr + g * stride_tg + t_off, mask=mask2, other=0)
            if BITS == 3:
                if NV == 2:
                    acc = _dot_s3_2(w0, w1, w2, w3, v0, v1, x_row, rows, tw, acc, XKIND, USE_ASM)
                else:
                    acc = _dot_s3_1(w0, w1, v0, x_row, rows, tw, acc, XKIND, USE_ASM)
            elif BITS == 5:
                if NV == 2:
                    acc = _dot_s5_2(w0, w1, w2, w3, w4, w5, w6, w7, v0, v1, x_row, rows, tw, acc, XKIND,
                                    USE_ASM)
                else:
                    acc = _dot_s5_1(w0, w1, w2, w3, v0, x_row, rows, tw, acc, XKIND, USE_ASM)
            else:
                if NV == 2:
                    acc = _dot_s6_2(w0, w1, w2, w3, v0, v1, x_row, rows, tw, acc, XKIND, USE_ASM)
                else:
                    acc = _dot_s6_1(w0, w1, v0, x_row, rows, tw, acc, XKIND, USE_ASM)
            tt += 1
            g += tl.where(tt == tpg, 1, 0)
            tt = tl.where(tt == tpg, 0, tt)
        out = tl.sum(acc, axis=0) * XSCALE
        _store_row_split_k(out, y_ptr, ws_ptr, lock_ptr, m, pid_n, pid_k, M, N, offs_n,
                           mask_n, stride_ym, SPLIT_K, BLOCK_N, ACC, DEFER)

H2_BITS = (2, 4, 8)  # launcher: widths that take the packed-half GEMV at M <= H2_MAX_M (CUDA)
H2_MAX_M = 1
H2_WORDS_PER_ASM = 2  # words whose f16 lane sums are added before the float32 conversion


def h2_config(bits: int, N: int, K: int, zfold: bool, acc: bool = False) -> tuple[int, int]:
    """(BLOCK_N, warps) of the launcher. Folded zero (session 3, device call 2 on an H200,
    benchmarks/results/quant_matmul_h2_z.json): 4 warps; BLOCK_N 256, 512 for the small matrices
    (N, K <= 8192: qkv / o_proj) at 2 and 8 bits, 128 for 8-bit large and for 4-bit down_proj-like
    (N <= 4096 < K); lm_head-sized N (>= 65536) 256 with 8 warps at 2 and 8 bits. x-sum form
    (session 2, H100, quant_matmul_h2.json): W2 512; W4 128, 512 for N, K <= 8192, 256 for
    lm_head; W8 128; 8 warps for W8 and lm_head W4. Two-slice widths (device call 5, H100):
    BLOCK_N 128 / 4 warps on the MLP shapes, 256 / 4 warps (8 at W6) with one slice-1 word per
    PTX block on lm_head, the row of their slice-0 width on qkv / o_proj; offline SASS per code (sm_90, 4
    warps): W3 3.55 at BLOCK_N 256/512 (2 slice-1 words per PTX block, 163-166 registers), 4.05
    at 128 (1 word, 72); W5 3.89 at 256 (166), 4.12 at 128 (93); W6 4.08 at 256 (128), 4.19 at
    128 (95); W2 / W4 at 256: 3.04 / 3.07. ``acc`` (pending sums, no ordered split-K ending; H100
    s9-8, W4 batch-1 decode graph): 4-bit down_proj-like shapes take 256 (graph 2.138 -> 2.057 ms;
    64 gave 2.065, 128 was the slowest); gate_up 256 (512 / 128 slower), qkv / o_proj 512 (256 level,
    128 slower) unchanged. W8 writing y (no ``acc``) on the MLP shapes: BLOCK_N 32 with the one-wave
    split (H100 s22-2, quant_matmul_h2split_s22_2: 4096x14336 / 14336x4096 26.1 / 26.5 us against 28.6 / 29.5
    at 128; 64 and 256 were slower; 6144x4096 level at 32 and 512)."""
    small, huge = N <= 8192 and K <= 8192, N >= 65536
    if bits in H2_SLICE_BITS:  # two-slice widths (device call 5, H100, quant_matmul_h2.json)
        if huge:
            return 256, 8 if bits == 6 else 4
        if not small:
            return 128, 4
        bits = 2 if bits == 3 else 4  # qkv / o_proj: the row of the slice-0 width
    if zfold:
        if huge and bits in (2, 8):
            return 256, 8
        if bits == 8 and not small and not acc:  # H100 s22-2: 26.1 / 26.5 against 28.6 / 29.5 us at 128
            return 32, 4
        if acc and not huge and H2_ACC_NARROW and (bits == 8 or (bits == 4 and N >= 16384)):
            return 64, 4  # pending sums: H2_ACC_NARROW
        if bits == 4:
            return (128 if N <= 4096 < K and not acc else 256), 4
        return (512 if small else 256 if bits == 2 else 128), 4
    warps = 8 if bits == 8 or (bits == 4 and huge) else 4
    if bits == 4:
        return (512 if small else 256 if huge else 128), warps
    return (512 if bits == 2 else 128), warps


_SMEM_PER_SM = 227 * 1024  # H100 / H200: shared memory a block may use per SM


H2_PROGRAMS_PER_SM = 3  # programs resident per SM assumed before the compiled kernel's registers are known
_RESIDENT: dict = {}  # kernel config -> programs resident per SM (from its register count)


_TABLES: dict = {}  # id(scales) -> (weakref to scales, versions key, table or None)


def _bn_override(N: int, K: int) -> int | None:
    """BLOCK_N from env ``ANYBIT_H2_BN`` (``NxK=BN,...`` or ``;``-separated, e.g.
    ``4096x14336=256``) for one weight shape, for experiments; None when the shape is not listed."""
    spec = os.environ.get("ANYBIT_H2_BN", "").replace(";", ",")
    for item in filter(None, spec.split(",")):
        shape, _, bn = item.partition("=")
        if shape == f"{N}x{K}":
            if not bn.isdigit() or int(bn) & (int(bn) - 1) or not 16 <= int(bn) <= 1024:
                raise ValueError(f"ANYBIT_H2_BN: BLOCK_N for {shape} must be a power of two in 16..1024, "
                                 f"got {bn!r}")
            return int(bn)
    return None


def zeros_are_codes(z: torch.Tensor, bits: int) -> bool:
    """Whether every zero point is an integer in [0, 2^bits) (RTN, GPTQ), the condition of the
    kernels that fold or subtract it exactly."""
    z = z.float()
    return bool(((z == z.round()) & (z >= 0) & (z < (1 << bits))).all())


def gemv_table(packed: PackedWeight) -> torch.Tensor | None:
    """int32 ``[K // G, N]`` per-column operands of the folded-zero GEMV: f16 scale in the low
    half, f16 ``-z 2^-S`` in the high half (exact: z is an integer in [0, 2^b)). None when some
    zero point is not such an integer (the kernel then keeps the x-sum form). Cached per scales
    tensor (keyed by its and the zeros' in-place versions); costs as much memory as the scales and
    zeros; built outside CUDA-graph capture (the engine runs every layer once before capturing)."""
    key = (packed.scales._version, packed.zeros._version, packed.zeros.data_ptr())
    hit = _TABLES.get(id(packed.scales))
    if hit is not None and hit[0]() is packed.scales and hit[1] == key:
        return hit[2]
    dev = packed.scales.device
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("gemv_table must be built before CUDA-graph capture: run the layer once first")
    z = packed.zeros.float()
    table = None
    if zeros_are_codes(z, packed.bits):
        lo = packed.scales.view(torch.int16).to(torch.int32) & 0xFFFF
        hi = (-z * 2.0 ** -H2_SHIFT[packed.bits]).half().view(torch.int16).to(torch.int32)
        table = (lo | (hi << 16)).contiguous()
    for k in [k for k, v in _TABLES.items() if v[0]() is None]:  # drop dead weights' tables
        del _TABLES[k]
    _TABLES[id(packed.scales)] = (weakref.ref(packed.scales), key, table)
    return table


def gemv_h2_applies(packed: PackedWeight, M: int, dtype: torch.dtype, on_cuda: bool) -> bool:
    """The launcher's choice of the packed-half GEMV (quant_matmul's "auto"): M <= H2_MAX_M, fp16/bf16
    x, on CUDA (not the interpreter: ``on_cuda``), uniform weights of H2_BITS, or of H2_SLICE_BITS with
    integer zero points (``gemv_table``; other zero points keep the generic GEMV)."""
    if not on_cuda or M > H2_MAX_M or packed.fmt != "uniform" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return packed.bits in H2_BITS or (packed.bits in H2_SLICE_BITS and gemv_table(packed) is not None)


# Pending sums (``acc``: float atomics, no split-K ending) of W2 / W5 / W6 whose one-wave split leaves at
# least H2_ACC_SHORT_MIN_TILES K tiles per program take H2_ACC_SHORT_TILES per program instead (at most 16
# splits): past one wave, short programs keep more loads in flight. H100 s27-3 / s27-4
# (quant_matmul_h2acc_s27_*, us, one-wave split / split 16): 28672x4096 (gate_up) W5 39.5 / 32.0, W6 37.6 /
# 37.3, W2 22.8 / 18.9; 14336x4096 W5 21.8 / 18.5, W6 21.0 / 20.1. Not taken: W3 level (28672x4096 25.5 /
# 25.3, 14336x4096 13.8 / 14.3), W4 and W8 slower (28672x4096 26.6 / 29.4, 49.0 / 51.4). Batch-1 decode
# (s27-4, W5 / W6): 379.9 / 356.8 tok/s against 345.7 / 353.7. W4 on gate_up at BLOCK_N 64 (``h2_config``)
# with 4 K tiles per program (split 8): 25.4 / 25.6 us against the launcher's 27.1 / 27.4 before (s27-6,
# s27-9: quant_matmul_h2accbn_*). Env ANYBIT_H2_ACC_SHORT=0: off (and W4 back to BLOCK_N 256 there).
H2_ACC_SHORT_BITS = (2, 4, 5, 6) if os.environ.get("ANYBIT_H2_ACC_SHORT", "1") != "0" else ()
# Pending sums at BLOCK_N 64 (``h2_config``): W4 on N >= 16384 (above) and W8 on every decode shape.
# H100 s27-12 (quant_matmul_h2accbn_w8_s27_12, W8, us, BLOCK_N 64 / the launcher's 128-512 before): gate_up
# 44.2 / 50.1, down 23.6 / 26.3, qkv 12.2 / 13.3, o_proj 8.1 / 8.0. Env ANYBIT_H2_ACC_SHORT=0: off too.
H2_ACC_NARROW = bool(H2_ACC_SHORT_BITS)
H2_ACC_SHORT_MIN_TILES = 8
H2_ACC_SHORT_TILES = {2: 2, 4: 4, 5: 2, 6: 2}  # K tiles per program by width
H2_ACC_MAX_SPLIT = 16


def pending_split(bits: int, k_tiles: int, split: int) -> int:
    """The split-K of a pending-sum call given its one-wave ``split`` (rule above; ``k_split`` then rounds it
    to equal K ranges)."""
    if bits not in H2_ACC_SHORT_BITS or k_tiles // split < H2_ACC_SHORT_MIN_TILES:
        return split
    return min(H2_ACC_MAX_SPLIT, k_tiles // H2_ACC_SHORT_TILES[bits])


def one_wave_split(tiles: int, k_tiles: int, slots: int) -> int:
    """The largest split-K (a divisor of k_tiles) whose tiles * split programs all fit at once in
    ``slots`` (resident programs on the GPU), so no second partial wave pays the per-program
    latency again; 1 when even one split per tile fills the GPU."""
    for per in range(1, k_tiles + 1):
        if k_tiles % per == 0 and tiles * (k_tiles // per) <= slots:
            return k_tiles // per
    return 1


def quant_gemv_h2(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_n: int | None = None,
                  block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                  use_asm: bool | None = None, words_per_asm: int | None = None, fuse_x: bool = True,
                  programs_per_sm: int | None = None, pdl: bool | None = None,
                  stages: int | None = None, zfold: bool | None = None,
                  acc: torch.Tensor | None = None, defer: bool | None = None) -> torch.Tensor:
    """Packed-half GEMV (uniform 2/4/8 bits; 3/5/6 bits with integer zero points through
    ``_quant_gemv_h2s_kernel``, ``words_per_asm`` then = slice-1 words per PTX block, 1 or 2, and
    only ``zfold``, ``fuse_x`` and ``stages`` 1): x ``[M, K]`` contiguous (perm applied)
    fp16/bf16/fp32, y ``[M, N]``. Products x * (q - 2^(b-1)) 2^-S are f16 (x rounded to f16:
    exact for bf16/fp16 x below 65504), summed in f16 over one or two words, then in float32.
    ``fuse_x``: convert x inside the GEMV (one launch) or in a separate kernel first; ``pdl``:
    programmatic dependent launch (None: on where anybit/kernels/pdl.py enables it); ``stages``:
    1 = the next weight tile prefetched into registers by hand, >= 2 = Triton's software pipeliner
    keeps ``stages - 1`` tiles of weights and x in flight (cp.async into shared memory); ``zfold``
    (None: where ``gemv_table`` exists, i.e. integer zero points): the zero point folded into the
    code conversion instead of an x-sum term. ``acc`` (float32 ``[M, N]``, zeroed; y may then be
    None): every program adds its partial into acc with a float atomic instead of the ordered
    split-K sum into y (anybit/layers/pending.py); returns acc. ``defer`` (split-K writing y): the
    programs store their partials and ``split_k_sum`` adds them in a second kernel (None:
    split_k_sum.defer_default) instead of the tile's last program."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    two = bits in H2_SLICE_BITS  # two-slice widths: _quant_gemv_h2s_kernel (folded zero only)
    if packed.fmt != "uniform" or (bits not in H2_BITS and not two):
        raise ValueError(f"path gemv_h2: needs a uniform 2/3/4/5/6/8-bit weight, got {packed.fmt} {bits}-bit")
    if use_asm is None:
        use_asm = x.is_cuda and not _INTERPRET
    P0 = 32 // bits
    if zfold is None and os.environ.get("ANYBIT_GEMV_ZFOLD", "1") == "0":
        zfold = False  # experiments: the x-sum form everywhere
    table = gemv_table(packed) if zfold is not False and fuse_x else None
    if zfold and table is None:
        raise ValueError("zfold: needs integer zero points in [0, 2^bits) and fuse_x")
    if two and (table is None or (stages or 1) != 1):
        raise ValueError(f"path gemv_h2: {bits}-bit weights need the folded zero (zfold: integer zero points "
                         f"in [0, 2^bits), fuse_x) and stages 1")
    auto_bn, auto_warps = h2_config(bits, N, K, table is not None, acc is not None)
    BN = block_n or _bn_override(N, K) or auto_bn
    BK = _pick_block_k(G, K, block_k or 128)
    wpt = words_per_asm or H2_WORDS_PER_ASM
    if wpt not in (1, 2) or (BK // P0) % wpt or two:
        wpt = 1
    num_n = triton.cdiv(N, BN)
    tiles = num_n * M
    sms = _num_sms(x.device)
    k_tiles = K // BK
    warps = num_warps or auto_warps
    # two-slice: slice-1 words per PTX block (words_per_asm; default 2 at 6 bits and where a thread has
    # >= 2 columns (BLOCK_N / warps >= 64) below lm_head size (call 5: nv 1 faster there), else 1,
    # 1 where a tile has only one slice-1 row (BLOCK_K 32 at 3/5 bits)
    nv = (words_per_asm or (2 if bits == 6 or (BN // warps >= 64 and N < 65536) else 1)) if two else 1
    if nv not in (1, 2) or BK * (bits - (2 if bits == 3 else 4)) // 32 < 2:
        nv = 1
    xkind = 3 if not fuse_x else {torch.bfloat16: 0, torch.float16: 1}.get(x.dtype, 2)
    stages = stages or 1  # the pipelined loop (stages >= 2) lost on every shape (session 3, call 1)
    sz = packed.scales if table is None else table
    # acc: the ACC twin compiles to another register count (no split-K sum)
    occ_key = (bits, BN, BK, wpt, xkind, warps, bool(use_asm), stages, table is not None, nv, acc is not None)
    deferred = False  # partials summed by split_k_sum's kernel (set below for a split-K call writing y)
    if split_k is None:
        per_sm = programs_per_sm or _RESIDENT.get(occ_key, H2_PROGRAMS_PER_SM)
        split_k = one_wave_split(tiles, k_tiles, per_sm * sms)
        if acc is not None:
            split_k = pending_split(bits, k_tiles, split_k)
    per, split_k = k_split(k_tiles, split_k)
    if acc is not None:
        if acc.dtype != torch.float32 or acc.shape != (M, N) or acc.stride(1) != 1:
            raise ValueError(f"acc must be a float32 [{M}, {N}] matrix with contiguous rows, got "
                             f"{acc.dtype} {tuple(acc.shape)}")
        ws, locks, y = acc, acc, acc
    elif split_k > 1:
        ws = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
        deferred = split_sum.defer_default("h2", bits, M) if defer is None else bool(defer)
        locks = ws if deferred else split_k_counters(x.device, tiles)
    else:
        ws, locks = y, y
    if fuse_x:
        if xkind < 2 and (x.storage_offset() % 2 or x.stride(0) % 2):
            x = torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)  # 4-byte aligned rows
        xin = x.view(torch.int32) if xkind < 2 else x.float()
        xq, xs, stride_x = xin, xin, xin.stride(0)
    else:
        xq = torch.empty(M, K // 2, dtype=torch.int32, device=x.device)
        xs = torch.empty(M, K // P0, dtype=torch.float32, device=x.device)
        _prep_x_h2_kernel[(M, triton.cdiv(K // P0, 256))](x, xq, xs, K, x.stride(0), P0, 256, num_warps=4)
        xin, stride_x = xq, 0
    # the prep kernel of fuse_x=False is not PDL-aware
    pdl = fuse_x and pdl_enabled(x.device, pdl)
    if two:
        kernel = _quant_gemv_h2s_kernel[(M, num_n, split_k)](
            xin, packed.qweight, table, y, ws, locks, M, N, K, G, stride_x, packed.qweight.stride(0),
            table.stride(0), y.stride(0), per * BK, per, 0, bits, float(2 ** H2_SHIFT[bits]), BN, BK, split_k,
            per if _INTERPRET else 0, bool(use_asm), xkind, nv, pdl, N % BN == 0, acc is not None, deferred,
            num_warps=warps, num_stages=1, **({"launch_pdl": True} if pdl else {}))
    else:
        kernel = _quant_gemv_h2_kernel[(M, num_n, split_k)](
            xin, xq, xs, packed.qweight, sz, packed.zeros, y, ws, locks, M, N, K, G,
            stride_x, packed.qweight.stride(0), sz.stride(0), y.stride(0), per * BK, per, 0,
            bits, float(2 ** H2_SHIFT[bits]), BN, BK, split_k, per if _INTERPRET else 0, bool(use_asm), wpt,
            xkind, pdl, stages, N % BN == 0, table is not None, acc is not None, deferred,
            num_warps=warps,
            num_stages=stages,
            **({"launch_pdl": True} if pdl else {}))
    if deferred:
        split_sum.split_k_sum(ws, y, pdl)
    regs = getattr(kernel, "n_regs", 0) if x.is_cuda else 0
    if regs and occ_key not in _RESIDENT:  # programs that fit on an SM at once, for the next split choice
        smem = max(1, getattr(kernel.metadata, "shared", 0) or 1)
        _RESIDENT[occ_key] = max(1, min(65536 // (-(-regs // 8) * 8 * 32 * warps), 64 // warps,
                                        _SMEM_PER_SM // smem))
    return y
