"""Register-to-tensor-core GEMV/GEMM for packed 1..7-bit weights (slices of 1, 2 and 4 bits) and
small M (Gluon, sm_80+): y = x @ dequant(W)^T for M = 1..16.

Why: the CUDA-core GEMV (quant_gemv_h2) spends ~3.3 instructions per W4 code (unpack, convert to
float32, one FFMA per code with x), so at M = 1 it is issue-bound at ~1.3 TB/s; the TMA/wgmma
kernels (quant_gemm_wg/ws) pay for shared-memory round trips and barriers per tile. Here every
thread loads its words straight into the registers where ``mma.sync`` wants the weights
(``DotOperandLayout(0, mma v2, k_width=8)``: 8 consecutive K of one row per thread, i.e. one W4
word) and unpacks them in place with quant_gemm_wg's PTX (``s (q - z)`` in bf16, rounded once);
the multiply-add with x is one ``mma.m16n8k16`` per word and thread (W4). No shared memory, no
barriers in the loop: ~1.5 instructions per W4 code. Except x at BLOCK_M 16 (``XS``, session 16):
loaded in the iteration that used it, its L2 latency was 28% of the warps' stall samples (ncu, H100
s16-1), so there it comes through a ``cp.async`` ring in shared memory.

Layout tricks (all bit relabelings, no data movement):
- Rows of the MMA are a permutation of the output columns, chosen so that each thread's 4 rows
  are 4 adjacent columns: one 16-byte load per word row (``_words_layout``, ``_relabel_cols``,
  ``_tile_cols_perm`` for the epilogue).
- W2 (16 codes per word) puts a word's codes 8..15 at MMA K positions 32 apart; x is relabeled
  the same way (``_relabel_k``): the dot sums over K, so any shared permutation is exact.

One program = ``BLOCK_N`` (128) output columns x one K split, 4 warps (32 columns each); rows of
x are the MMA's N side (BLOCK_M 8 or 16; rows >= M read as 0). The next tile's words and scale
rows are loaded before the current one is converted. Split-K partials are summed by the tile's
last program (quant_gemm_wg's epilogue) or, where ``split_k_sum.defer_default`` says so
(``DEFER_MMA``: widths by M range), stored only and added by split_k_sum.py's second kernel.

Testing as the other Gluon kernels: no ``TRITON_INTERPRET``; the CPU tests compile it for sm_90
offline and check the loop (no shared memory, LDG.128, HMMA), the GPU tests compare with
``ref_quant_matmul``.
"""

from __future__ import annotations

import os
import struct
import weakref

import torch

from anybit.kernels import split_k_sum as split_sum
from anybit.kernels.pdl import pdl_enabled
from anybit.kernels.quant_gemm_h2 import _half2, _lock_buffer, _pair_layout
from anybit.kernels.quant_gemm_wg import gluon
from anybit.kernels.quant_gemv_h2 import _INTERPRET, _num_sms, k_split, zeros_are_codes
from anybit.quant.format import SLICES, PackedWeight

MMA_SLICE_BITS = (1, 2, 4, 8)  # slice widths whose words fill whole k_width-8 operand rows after relabeling
MMA_BITS = tuple(b for b, parts in SLICES.items() if all(w in MMA_SLICE_BITS for w in parts))  # 1..8
MMA_MAX_M = 64  # BLOCK_M 32 / 64 (from M 17) take the scaled conversion (the kernel's SA)
# W8 runs the MMA in float16: 1024 + q is exact there (bf16 has 8 significant bits), so a pair of codes
# costs a prmt and a sub. x enters as float16 times 2^-6 and the partial sums are scaled back by 64: exact for
# |x| in [2^-8, 2^22); below 2^-8 float16's subnormal step (2^-18 in x) is at most bf16's own rounding of
# 2^-8. |x| >= 2^22 (4.2e6) would overflow (H100 s23-1: 2^-4 overflowed a test's x of ~1e6).
MMA_W8_X_SCALE = 2.0 ** -6
# W8's K tile: 64 (a 128-K tile holds 32 words per thread and buffer; offline sm_90 at BLOCK_M 8, M = 1:
# 108 registers at 64, 128 plus a stack frame at 128).
MMA_W8_BLOCK_K = int(os.environ.get("ANYBIT_MMA_W8_BK", "64"))  # env: experiments


def _mma_asm(bits: int, scaled: bool = False) -> str:
    """PTX for one word of a b-bit slice (b in 1/2/4/8): inputs ``$P`` = the word, ``$P+1`` = bf16
    ``-(128 + z)`` (z the column's integer zero point); outputs ``$0..$P-1`` = bf16 ``q - z``
    (exact) of the codes in pair order: output 2 p + h is code p + h P / 2 (the two halves of one
    bf16x2). Per pair: ``lop3 (w >> shift & mask) | 0x4300`` = 128 + q 2^(f b) (fields of <= 7
    bits, ``_pair_layout``), one ``fma`` by 2^(-f b) with ``-(128 2^(-f b) + z)``. b = 8: float16
    throughout (``$5`` = f16 ``1024 + z``): ``prmt`` puts bytes p and p + 2 under the exponent
    byte 0x64 (1024 + q, exact), one ``sub`` gives q - z. ``scaled``: one more input ``$P+2``, the column's
    scale s (bf16; W8 f16), and the outputs are s (q - z), rounded once (one more ``fma`` per pair)."""
    P = 32 // bits
    w, zh = f"${P}", f"${P + 1}"
    ty = "f16x2" if bits == 8 else "bf16x2"
    scale = [f"fma.rn.{ty} t, t, s0, n0;"] if scaled else []
    head = [f"mov.b32 s0, {{${P + 2}, ${P + 2}}};", "mov.b32 n0, 0x80008000;"] if scaled else []
    if bits == 8:
        lines = ["{", ".reg .b32 t, z0, s0, n0;", f"mov.b32 z0, {{{zh}, {zh}}};"] + head
        for p in range(2):
            lines += [f"prmt.b32 t, {w}, 0x64646464, 0x{0x4240 + 0x101 * p:04X};", "sub.f16x2 t, t, z0;",
                      *scale, f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, t;"]
        return "\n".join(lines + ["}"])
    lines = ["{", ".reg .b32 t, u, z0, k, c, s0, n0;", f"mov.b32 z0, {{{zh}, {zh}}};"] + head
    for p in range(P // 2):
        low, f = _pair_low_bits(w, bits, p)
        lines += low + _pair_minus_zero(bits, f) + scale + [f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, t;"]
    return "\n".join(lines + ["}"])


def _pair_low_bits(w: str, bits: int, p: int) -> tuple[list[str], int]:
    """PTX: pair p's codes of the b-bit word ``w`` into ``t`` as bf16 ``128 + q 2^(f b)`` (``_pair_layout``:
    a shift into ``u`` where needed, then ``lop3 (w & mask) | 0x4300``); returns the lines and f."""
    shift, f = _pair_layout(bits, p, True)
    mask = ((1 << bits) - 1) << (f * bits)
    lines, src = [], w
    if shift:
        lines.append(f"shr.u32 u, {w}, {shift};")
        src = "u"
    lines.append(f"lop3.b32 t, {src}, 0x{mask | mask << 16:08X}, 0x43004300, 0xEA;")
    return lines, f


def _pair_minus_zero(bits: int, f: int) -> list[str]:
    """PTX: ``t`` (bf16 ``128 + q 2^(f b)``) -> ``q - z`` exactly, by one ``fma`` with z0 = ``-(128 + z)``."""
    sc = 2.0 ** (-f * bits)
    if f:  # -(128 sc + z) = -(128 + z) + 128 (1 - sc), exact in bf16
        return [f"mov.b32 k, {_half2(128.0 * (1.0 - sc), True)};", f"mov.b32 c, {_half2(1.0, True)};",
                "fma.rn.bf16x2 c, z0, c, k;", f"mov.b32 k, {_half2(sc, True)};", "fma.rn.bf16x2 t, t, k, c;"]
    return [f"mov.b32 k, {_half2(1.0, True)};", "fma.rn.bf16x2 t, t, k, z0;"]


def _mma_hb_asm(lo: int, hi: int, scaled: bool = False) -> str:
    """PTX for one word of a uniform weight's lowest slice (``lo`` = 2 or 4 bits, P = 32 / lo codes) with
    its codes' high bits (the next slice, ``hi`` = 1 or 2 bits) merged (the kernel's HB: W3 = 2 + 1, W5 =
    4 + 1, W6 = 4 + 2): inputs ``$P`` = the word (code j at bits lo j..), ``$P+1`` = the high bits (code j's
    at bits hi j.., bits from hi P on ignored: ``_load_high_bits``), ``$P+2`` = bf16 ``-(128 + z)``;
    outputs ``$0..$P-1`` = bf16 ``q - z`` (exact) in the lo-bit slice's pair order (output 2 p + h is code
    p + h P / 2). The high bits of codes P / 2.. move up to bit 16 (``prmt`` for a byte, else a shift and a
    ``lop3``); per pair the lo-bit slice's ``lop3`` puts the low bits at field f (``_pair_layout``: bits
    lo f..), a shift and a second ``lop3`` the high bits right above them in both halves (fields up to bit
    6, under bf16's 7-bit mantissa), then the slice's ``fma``. ``scaled``: ``$P+3`` = the column's scale s
    (bf16), and the outputs are s (q - z), rounded once."""
    P = 32 // lo
    w, hb, zh = f"${P}", f"${P + 1}", f"${P + 2}"
    lines = ["{", ".reg .b32 t, u, v, hs, z0, k, c, s0, n0;", f"mov.b32 z0, {{{zh}, {zh}}};"]
    if scaled:
        lines += [f"mov.b32 s0, {{${P + 3}, ${P + 3}}};", "mov.b32 n0, 0x80008000;"]
    move = 16 - hi * P // 2  # codes P / 2..'s high bits: from bit hi P / 2 to bit 16
    if move == 8:
        lines.append(f"prmt.b32 hs, {hb}, 0, 0x4140;")  # byte 1 to byte 2
    else:
        lines += [f"shl.b32 v, {hb}, {move};", f"lop3.b32 hs, {hb}, v, 0x0000FFFF, 0xE4;"]  # c ? a : b
    for p in range(P // 2):
        low, f = _pair_low_bits(w, lo, p)
        top = lo * f + lo  # the high bits' place in the field
        assert top + hi <= 7
        lines += low
        d, hsrc = hi * p - top, "hs"  # code p's high bits from bit hi p to bit top
        if d:
            lines.append(f"shr.u32 v, hs, {d};" if d > 0 else f"shl.b32 v, hs, {-d};")
            hsrc = "v"
        hmask = ((1 << hi) - 1) << top
        lines.append(f"lop3.b32 t, {hsrc}, 0x{hmask | hmask << 16:08X}, t, 0xEA;")
        lines += _pair_minus_zero(lo, f)
        if scaled:
            lines.append("fma.rn.bf16x2 t, t, s0, n0;")
        lines.append(f"mov.b32 {{${2 * p}, ${2 * p + 1}}}, t;")
    return "\n".join(lines + ["}"])


# Uniform widths whose second slice merges into the first's conversion (the kernel's HB): width -> (lo, hi)
MMA_HB_SLICES = {3: (2, 1), 5: (4, 1), 6: (4, 2)}


# Codebook weights (``W = codebook[q] s``, 4-bit nf4 / fp4 / learned tables): one 32-bit shared-memory load
# per byte of a word gives the bf16 pair (codebook[low nibble], codebook[high nibble]). The 256 pairs are
# stored once per lane (32 copies, bank-private: lane l reads word 32 e + l of entry e), so no load of a warp
# conflicts whatever its codes: 32 KB per program, the kernel's first shared allocation (offset 0).
MMA_CB_ENTRIES = 256
MMA_CB_LANES = 32


def _table_head(scale: str | None) -> list[str]:
    """PTX: with a scale input (bf16), the pair ``{s, s}`` and the ``fma`` addend -0 of scaled table
    values."""
    return [f"mov.b32 s2, {{{scale}, {scale}}};", "mov.b32 n0, 0x80008000;"] if scale else []


def _table_entry(word: str, base: str, i: int, load: str) -> list[str]:
    """PTX: byte i of ``word`` (zero extended) is a table entry of 128 bytes: its address ``base + byte *
    128`` in ``t``, then ``load`` (a shared load from ``[t]``)."""
    return [f"prmt.b32 t, {word}, 0, 0x{0x4440 + i:04X};", "shl.b32 t, t, 7;", f"add.u32 t, t, {base};", load]


def _lut_asm(scaled: bool = False) -> str:
    """PTX for one word of 4-bit codebook codes: inputs ``$8`` = the word, ``$9`` = this lane's table base
    (shared address of entry 0's copy for the lane); outputs ``$0..$7`` = bf16 ``codebook[q]`` of the
    codes in natural order (output j = code j, bits 4j..4j+3). Per byte: ``prmt`` (the byte, zero
    extended), address ``base + byte * 128``, one ``ld.shared.b32``. ``scaled``: one more input ``$10``,
    the column's scale s (bf16), and the outputs are ``s codebook[q]`` rounded once (one ``fma`` per
    pair)."""
    lines = ["{", ".reg .b32 t, r, s2, n0;", *_table_head("$10" if scaled else None)]
    for i in range(4):
        lines += [*_table_entry("$8", "$9", i, "ld.shared.b32 r, [t];"),
                  *(["fma.rn.bf16x2 r, r, s2, n0;"] if scaled else []),
                  f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, r;"]
    return "\n".join(lines + ["}"])


# 2-bit codebook weights: one byte of a word holds 4 codes, and its table entry the 4 bf16 values (two pairs,
# 8 bytes): 256 entries x 16 copies (lanes l and l + 16 share one; a warp's 64-bit loads run as two half-warp
# phases, so no load conflicts whatever the codes) = 32 KB, as large as the 4-bit pair table.
MMA_CB2_COPIES = 16


def _lut2_asm(scaled: bool = False) -> str:
    """PTX for one word of 2-bit codebook codes: inputs ``$16`` = the word, ``$17`` = this lane's table base
    (shared address of entry 0's copy for the lane, ``_table_base``); outputs ``$0..$15`` = bf16
    ``codebook[q]`` of the codes in natural order (output j = code j, bits 2j..2j+1). Per byte: ``prmt``
    (the byte, zero extended), address ``base + byte * 128``, one ``ld.shared.v2.b32`` (the byte's 4 values).
    ``scaled``: one more input ``$18``, the column's scale s (bf16), and the outputs are ``s codebook[q]``
    rounded once (one ``fma`` per pair)."""
    lines = ["{", ".reg .b32 t, r0, r1, s2, n0;", *_table_head("$18" if scaled else None)]
    for i in range(4):
        lines += _table_entry("$16", "$17", i, "ld.shared.v2.b32 {r0, r1}, [t];")
        if scaled:
            lines += ["fma.rn.bf16x2 r0, r0, s2, n0;", "fma.rn.bf16x2 r1, r1, s2, n0;"]
        lines += [f"mov.b32 {{${4 * i}, ${4 * i + 1}}}, r0;", f"mov.b32 {{${4 * i + 2}, ${4 * i + 3}}}, r1;"]
    return "\n".join(lines + ["}"])


# 3-bit codebook weights (slices 2 + 1): a byte of the 2-bit word holds 4 codes' low bits, and its table
# entry the 8 bf16 values codebook[lo] and codebook[lo + 4] of those codes (16 bytes); the 1-bit word's bits
# pick one of the two per code. 256 entries x 8 copies (a warp's 128-bit loads run as four quarter-warp
# phases) = 32 KB.
MMA_CB3_COPIES = 8


def _lut3_asm(scaled: bool = False) -> str:
    """PTX for one word of 3-bit codebook codes: inputs ``$16`` = the low 2 bits of 16 codes (a 2-bit slice
    word), ``$17`` = their high bits at bits 0..15 (code j at bit j), ``$18`` = this lane's table base
    (``_table_base``); outputs ``$0..$15`` = bf16 ``codebook[q]`` in natural code order. Per byte of
    low bits: ``prmt``, address, one ``ld.shared.v4.b32`` (both candidates of 4 codes); the byte's 4 high
    bits spread to the sign bits of a register's bytes (one ``mul.lo`` by 0x10204080: bit b lands on bit
    8 b + 7), then per pair a ``prmt`` in sign-replicate mode makes a half-word mask and one ``lop3``
    selects. ``scaled``: one more input ``$19``, the column's scale s (bf16), outputs ``s codebook[q]``
    rounded once (one ``fma`` per pair)."""
    lines = ["{", ".reg .b32 t, a0, a1, b0, b1, h, m, r0, r1, s2, n0;",
             *_table_head("$19" if scaled else None)]
    for i in range(4):
        lines += _table_entry("$16", "$18", i, "ld.shared.v4.b32 {a0, a1, b0, b1}, [t];")
        lines += [f"shr.b32 h, $17, {4 * i};"] if i else ["mov.b32 h, $17;"]
        lines += ["and.b32 h, h, 15;", "mul.lo.u32 h, h, 0x10204080;"]
        for p, (a, b, sel) in enumerate((("a0", "b0", "0x9988"), ("a1", "b1", "0xBBAA"))):
            lines += [f"prmt.b32 m, h, 0, {sel};", f"lop3.b32 r{p}, {a}, {b}, m, 0xD8;"]
            if scaled:
                lines.append(f"fma.rn.bf16x2 r{p}, r{p}, s2, n0;")
        lines += [f"mov.b32 {{${4 * i}, ${4 * i + 1}}}, r0;", f"mov.b32 {{${4 * i + 2}, ${4 * i + 3}}}, r1;"]
    return "\n".join(lines + ["}"])


if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    from anybit.kernels.quant_gemm_wg import _join8, _store_tile, _words_tile

    # x -> float16 times MMA_W8_X_SCALE in PTX (written in Triton, the compiler rounded to float16 before
    # scaling, which overflows above 65504), and the factor that undoes the scale on the sums
    _W8_X_SCALE_BITS = struct.unpack("<I", struct.pack("<f", MMA_W8_X_SCALE))[0]
    _W8_X_ASM: gl.constexpr = gl.constexpr(
        "{ .reg .f32 f; cvt.f32.bf16 f, $1; "
        f"mul.rn.f32 f, f, 0f{_W8_X_SCALE_BITS:08X}; cvt.rn.f16.f32 $0, f; }}")
    _W8_X_UNSCALE: gl.constexpr = gl.constexpr(1.0 / MMA_W8_X_SCALE)

    _WORD_ASM = {(b, sc): _mma_asm(b, sc) for b in MMA_SLICE_BITS for sc in (False, True)}
    _WORD_ASM.update({(lo + hi, sc): _mma_hb_asm(lo, hi, sc) for lo, hi in MMA_HB_SLICES.values()
                      for sc in (False, True)})  # a slice's words + the next slice's bits (HB)
    _LUT_WORD_ASM = {(b, sc): {4: _lut_asm, 2: _lut2_asm, 3: _lut3_asm}[b](sc) for b in (2, 3, 4)
                     for sc in (False, True)}

    @gluon.jit
    def _fill_lut(cb_ptr):
        """The codebook pair table ``[MMA_CB_ENTRIES, MMA_CB_LANES]`` int32 in shared memory: entry e =
        bf16 pair (codebook[e & 15] low, codebook[e >> 4] high), the same in every lane's column. Must be
        the kernel's first shared allocation (``_table_base`` reads it from offset 0; the offline test
        checks the compiled allocation); a CTA barrier follows."""
        L: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
        tab = gl.allocate_shared_memory(gl.int32, [256, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        e = gl.arange(0, 256, layout=gl.SliceLayout(1, L))
        lo = gl.load(cb_ptr + (e & 15)).to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        hi = gl.load(cb_ptr + (e >> 4)).to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) << 16
        tab.store(gl.zeros([256, 32], gl.int32, L) + (lo | hi)[:, None])
        gl.thread_barrier()

    @gluon.jit
    def _fill_byte_table(cb_ptr, HIGH: gl.constexpr = False):
        """The table of a 2-bit codebook (``_lut2_asm``) or, HIGH, a 3-bit one (``_lut3_asm``): ``[256, 32]``
        int32 in shared memory, entry e a byte of (low) 2-bit codes. 2-bit: 16 copies (int32 columns 2 l,
        2 l + 1) of the bf16 pairs (codebook[e & 3], codebook[e >> 2 & 3]) and (codebook[e >> 4 & 3],
        codebook[e >> 6]). 3-bit: 8 copies (columns 4 c .. 4 c + 3) of the same pairs with high bit 0, then
        with high bit 1 (column 4 c + w: codes 2 (w & 1), 2 (w & 1) + 1 of the byte, high bit w >> 1). Must
        be the kernel's first shared allocation (``_table_base`` reads it from offset 0); a
        CTA barrier follows."""
        L: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
        tab = gl.allocate_shared_memory(gl.int32, [256, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        e = gl.arange(0, 256, layout=gl.SliceLayout(1, L))[:, None]
        c = gl.arange(0, 32, layout=gl.SliceLayout(0, L))[None, :]
        sh = 4 * (c & 1)
        if HIGH:  # codebook[lo + 4] in the second half of each copy
            e4 = 4 * ((c >> 1) & 1)
        else:
            e4 = 0 * c
        lo = gl.load(cb_ptr + ((e >> sh) & 3) + e4).to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32)
        hi = gl.load(cb_ptr + ((e >> (sh + 2)) & 3) + e4).to(gl.bfloat16).to(gl.int16, bitcast=True)
        tab.store((lo & 0xFFFF) | (hi.to(gl.int32) << 16))
        gl.thread_barrier()

    @gluon.constexpr_function
    def _table_base_asm(bits):
        """PTX of ``_table_base``: global_smem + copy * entry size, copy = lane (4-bit table, 4-byte entries),
        lane & 15 (2-bit, 8 bytes) or lane & 7 (3-bit, 16 bytes)."""
        copies, size = {4: (32, 4), 2: (16, 8), 3: (8, 16)}[int(bits)]
        mask = f"and.b32 l, l, {copies - 1}; " if copies < 32 else ""
        return (f"{{ .reg .b32 l; mov.u32 l, %laneid; {mask}mov.u32 $0, global_smem; "
                f"mad.lo.u32 $0, l, {size}, $0; }}")

    @gluon.jit
    def _table_base(BITS: gl.constexpr):
        """Shared address of this lane's copy of entry 0 of the codebook table of ``BITS``-bit codes
        (``_fill_lut``'s for 4, ``_fill_byte_table``'s for 2 and 3; the kernel's first shared allocation, at
        offset 0)."""
        return gl.inline_asm_elementwise(_table_base_asm(BITS), "=r", [], dtype=gl.int32, is_pure=True,
                                         pack=1)

    @gluon.constexpr_function
    def _word_asm(bits, scaled):
        """``_mma_asm(bits, scaled)`` as a compile-time constant."""
        return _WORD_ASM[(int(bits), bool(scaled))]

    @gluon.constexpr_function
    def _lut_word_asm(bits, scaled):
        """``_lut_asm(scaled)`` (4-bit codes), ``_lut2_asm(scaled)`` (2-bit) or ``_lut3_asm(scaled)`` (3-bit)
        as a compile-time constant."""
        return _LUT_WORD_ASM[(int(bits), bool(scaled))]

    @gluon.constexpr_function
    def _cga(cluster):
        """CTA bases of a 2-D layout replicated over a cluster of ``cluster`` CTAs (every CTA holds
        the whole tile: each works on its own K split, the compiler only sees copies)."""
        return [[0, 0]] * (int(cluster).bit_length() - 1)

    @gluon.constexpr_function
    def _mma_layout(cluster):
        """``mma.sync`` m16n8 accumulators on 4 warps along the tile's rows (output columns)."""
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8],
                                         cga_layout=_cga(cluster))

    @gluon.constexpr_function
    def _words_layout(rows, cols, cluster=1):
        """Layout of the words ``[R, 128]`` on 4 warps: 4 adjacent columns per thread (16-byte
        loads), lanes over 4 word rows x 8 column quads, warps over 32-column blocks; word rows
        beyond 4 repeat in registers. After ``_relabel_cols`` and unpacking it is the MMA's A
        operand layout (k_width 8) up to the order of registers."""
        assert cols == 128 and rows >= 4
        return gl.BlockedLayout([1, 4], [4, 8], [1, 4], [0, 1], cga_layout=_cga(cluster))

    @gluon.constexpr_function
    def _x_layout(block_k, block_m, bits, cluster=1):
        """Layout of the x^T tile ``[BK, BM]`` in natural K order whose ``_relabel_x`` is the MMA's B
        operand layout (k_width 8): 8 consecutive K per thread (one 16-byte load; W2: two 8-byte
        ones; W1: 32-byte rows of 16 K), lanes over the next two K bits and 8 rows of x, warps
        replicated."""
        if bits == 1:  # natural K of MMA K bits 1, 2, 4 | 8, 16 (lanes) | 32, 64 | 128 (see _relabel_x)
            regs, lanes = [1, 2, 4, 8, 16] + [k for k in (128,) if k < block_k], [32, 64]
        elif bits == 2:  # natural K of MMA K bits 1, 2, 4 | 32 | 8, 16 (see _relabel_x)
            regs, lanes = [1, 2, 4, 8] + [k for k in (64, 128) if k < block_k], [16, 32]
        elif bits == 8:  # natural K of MMA K bits 1, 2, 4 | 8, 16 (lanes) | 32, 64 (see _relabel_x)
            regs, lanes = [1, 2, 16] + [k for k in (32, 64, 128) if k < block_k], [4, 8]
        else:
            regs, lanes = [1, 2, 4] + [k for k in (32, 64, 128) if k < block_k], [8, 16]
        reg = [[k, 0] for k in regs]
        reg += [[0, m] for m in (8, 16, 32) if m < block_m]
        lane = [[lanes[0], 0], [lanes[1], 0], [0, 1], [0, 2], [0, 4]]
        return gl.DistributedLinearLayout(reg, lane, [[0, 0], [0, 0]], _cga(cluster), [block_k, block_m])

    @gluon.constexpr_function
    def _x_copy_layout(block_k, block_m, cluster=1):
        """Layout of the x^T tile ``[BK, BM]`` for its asynchronous copy into shared memory: one
        16-byte piece (8 consecutive K of one MMA column) per thread and copy, lanes along K first,
        then over columns, warps over columns (no thread copies what another copies, except where the
        tile is smaller than 128 pieces)."""
        lanes_k = min(32, block_k // 8)
        return gl.BlockedLayout([8, 1], [lanes_k, 32 // lanes_k], [1, 4], [0, 1], cga_layout=_cga(cluster))

    @gluon.constexpr_function
    def _x_smem_layout(bits, block_k, cluster=1):
        """Shared layout of an x^T tile ``[BK, BM]`` (K contiguous, one row per MMA column) for
        ``_x_layout``'s reads of a ``bits``-wide slice. Unswizzled, the lanes of one 16-byte read hit
        the same banks in columns j and j + 1 (W4 and W2: 2-way conflicts). XOR-ing column j's lowest
        bit into K bit 5 (W4: the bit above the lanes' K bits 3-4) or bit 3 (W2) removes them
        (``gl.bank_conflicts`` = 0 for BK 64/128, BM 8/16: a CPU test). W1: none of the swizzles that
        keep 16-byte copies reaches 0 (3 excess wavefronts); left unswizzled."""
        if int(bits) == 4 and int(block_k) >= 64:
            return gl.SwizzledSharedLayout(32, 1, 2, [0, 1], cga_layout=_cga(cluster))
        if int(bits) == 2:
            return gl.SwizzledSharedLayout(8, 1, 2, [0, 1], cga_layout=_cga(cluster))
        return gl.SwizzledSharedLayout(8, 1, 1, [0, 1], cga_layout=_cga(cluster))

    @gluon.jit
    def _relabel_cols(t):
        """``[R, 128]`` -> same registers, column c = n64 n32 n16 n8 n4 n2 n1 (bits) becomes MMA row
        n2 n64 n32 n1 n16 n8 n4: the thread's 4 adjacent columns land on its MMA rows r, r + 8,
        r + 64, r + 72."""
        R: gl.constexpr = t.shape[0]
        t = gl.reshape(t, [R, 2, 2, 8, 2, 2])
        return gl.reshape(gl.permute(t, (0, 4, 1, 2, 5, 3)), [R, 128])

    @gluon.jit
    def _ks_sum(acc, KS: gl.constexpr, MR: gl.constexpr):
        """``acc [128, BM]`` of a KS > 1 tile (MMA row i = tile column t(i) = kr CW + c, MMA column j =
        kr' MR + m) -> ``[CW, MR]``: the sum over kr of the entries with kr' = kr (the others pair a
        weight chunk with another chunk's x), rows in column order c."""
        BM: gl.constexpr = acc.shape[1]
        CW: gl.constexpr = 128 // KS
        L: gl.constexpr = acc.type.layout
        t = _tile_col(gl.arange(0, 128, layout=gl.SliceLayout(1, L)))
        j = gl.arange(0, BM, layout=gl.SliceLayout(0, L))
        a = gl.where((t // CW)[:, None] == (j // MR)[None, :], acc, 0.0)
        a = gl.reshape(a, [2, 2, 2, 2, 2, 2, 2, BM])  # MMA row bits i6 .. i0, j
        a = gl.permute(a, (1, 2, 4, 5, 6, 0, 3, 7))  # tile column bits t6 .. t0 (see _tile_col), j
        a = gl.sum(gl.reshape(a, [KS, CW, BM // MR, MR]), axis=2)
        return gl.sum(a, axis=0)

    @gluon.jit
    def _relabel_a(a, W0: gl.constexpr):
        """W2: weights ``[128, BK]`` with k' = 16 r + 8 j2 + (pair-order index of j0 j1 j3) -> MMA K
        order: j2 goes to K bit 5, word-row bits 0-1 to K bits 3-4 (the lanes of k_width 8). W1:
        k' = 32 r + 16 j3 + 8 j2 + (pair-order index of j0 j1 j4) -> j3 j2 to K bits 6, 5, word-row
        bits 0-1 to K bits 3-4, further word rows to K bit 7."""
        if W0 == 8:
            BK: gl.constexpr = a.shape[1]
            a = gl.reshape(a, [128, BK // 32, 2, 4, 4])  # r_hi, r2, (r1 r0), (j0 j1)
            a = gl.reshape(gl.permute(a, (0, 1, 3, 2, 4)), [128, BK])
        elif W0 == 1:
            BK: gl.constexpr = a.shape[1]
            a = gl.reshape(a, [128, BK // 128, 2, 2, 2, 2, 8])  # r_hi, r1, r0, j3, j2, (j1 j0 j4)
            a = gl.reshape(gl.permute(a, (0, 1, 4, 5, 2, 3, 6)), [128, BK])
        elif W0 == 2:
            BK: gl.constexpr = a.shape[1]
            a = gl.reshape(a, [128, BK // 64, 2, 2, 2, 8])  # r_hi, r1, r0, j2, (j1 j0 j3)
            a = gl.reshape(gl.permute(a, (0, 1, 4, 2, 3, 5)), [128, BK])
        return a

    @gluon.jit
    def _swap_k15(t):
        """``[R, BK]`` -> K bits 1 and 5 exchanged (a register relabeling in the MMA operand layouts). For
        codebook words, whose shared-table loads give natural K pairs: each HMMA of the k_width-8 B operand
        takes K' pairs 2i and 32 + 2i, which after the swap are adjacent registers of one 16-byte x load
        (natural K 2i, 2i + 2), so x needs no moves; the weights get the same swap (``_unpack_tile``)."""
        R: gl.constexpr = t.shape[0]
        BK: gl.constexpr = t.shape[1]
        t = gl.reshape(t, [R, BK // 64, 2, 2, 2, 2, 2, 2])  # K bits 6.., 5, 4, 3, 2, 1, 0
        return gl.reshape(gl.permute(t, (0, 1, 6, 3, 4, 5, 2, 7)), [R, BK])

    @gluon.jit
    def _relabel_cb2(t):
        """``[rows, BK]`` with k = 16 r + j (2-bit codebook words in natural code order, word row r, code j)
        -> the MMA K order r_hi j3 r1 r0 j2 j1 j0: word-row bits 0-1 to K bits 3-4 (the lanes of k_width 8),
        code bit 3 to K bit 5, then K bits 1 and 5 exchanged (``_swap_k15``: each HMMA's x pair in adjacent
        registers of one load). Both operands get it."""
        R: gl.constexpr = t.shape[0]
        BK: gl.constexpr = t.shape[1]
        t = gl.reshape(t, [R, BK // 64, 2, 2, 2, 8])  # r_hi, r1, r0, j3, (j2 j1 j0)
        t = gl.reshape(gl.permute(t, (0, 1, 4, 2, 3, 5)), [R, BK])
        return _swap_k15(t)

    @gluon.jit
    def _relabel_x(xt, W0: gl.constexpr):
        """x ``[BM, BK]`` natural K -> the weights' MMA K order: within a word's 8 (W4) codes pair
        order (j0 j1 j2 -> bits j2 j0 j1 from low to high); W2 as ``_relabel_a``; 16: 4-bit codebook
        words (natural order); 14: 2-bit codebook words (``_relabel_cb2``)."""
        BM: gl.constexpr = xt.shape[0]
        BK: gl.constexpr = xt.shape[1]
        if W0 == 8:  # natural r_hi r2 r1 r0 j1 j0 -> r_hi r1 r0 r2 j0 j1
            xt = gl.reshape(xt, [BM, BK // 32, 2, 2, 2, 2, 2])
            xt = gl.permute(xt, (0, 1, 3, 4, 2, 6, 5))
        elif W0 == 1:  # natural r_hi r1 r0 j4 j3 j2 j1 j0 -> r_hi j3 j2 r1 r0 j1 j0 j4
            xt = gl.reshape(xt, [BM, BK // 128, 2, 2, 2, 2, 2, 2, 2])
            xt = gl.permute(xt, (0, 1, 5, 6, 2, 3, 7, 8, 4))
        elif W0 == 2:  # natural r_hi r1 r0 j3 j2 j1 j0 -> r_hi j2 r1 r0 j1 j0 j3
            xt = gl.reshape(xt, [BM, BK // 64, 2, 2, 2, 2, 2, 2])
            xt = gl.permute(xt, (0, 1, 5, 2, 3, 6, 7, 4))
        elif W0 == 16:  # codebook words: natural K with bits 1 and 5 swapped (``_swap_k15``)
            xt = _swap_k15(xt)
        elif W0 == 14:  # 2-bit codebook words (``_relabel_cb2``)
            xt = _relabel_cb2(xt)
        else:  # natural r j2 j1 j0 -> r j1 j0 j2
            xt = gl.reshape(xt, [BM, BK // 8, 2, 2, 2])
            xt = gl.permute(xt, (0, 1, 3, 4, 2))
        return gl.reshape(xt, [BM, BK])

    @gluon.jit
    def _x_operand(ptrs, mask, BL: gl.constexpr, W0: gl.constexpr, SCALE: gl.constexpr = 1.0):
        """The x^T tile ``[BK, BM]`` (rows >= M as 0) relabeled into the MMA's B operand layout,
        times SCALE (a power of two: exact; the weight of a higher slice's codes)."""
        return _x_from_tile(gl.load(ptrs, mask=mask, other=0.0), BL, W0, SCALE)

    @gluon.jit
    def _x_from_tile(xt, BL: gl.constexpr, W0: gl.constexpr, SCALE: gl.constexpr = 1.0):
        """``_x_operand`` of a loaded x^T tile (``_x_layout`` for the slice width W0); W0 8: float16
        times ``MMA_W8_X_SCALE``."""
        if W0 == 8:
            xt = gl.inline_asm_elementwise(_W8_X_ASM, "=h,h", [xt], dtype=gl.float16, is_pure=True, pack=1)
        elif SCALE != 1.0:
            xt = (xt.to(gl.float32) * SCALE).to(gl.bfloat16)
        return gl.convert_layout(gl.permute(_relabel_x(gl.permute(xt, (1, 0)), W0), (1, 0)), BL)

    @gluon.jit
    def _x_tile_ptrs(x_ptr, stride_xm, M, XL: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_M: gl.constexpr,
                     KS: gl.constexpr = 1, MR: gl.constexpr = 0):
        """Pointers ``[BLOCK_K, BLOCK_M]`` (layout XL) of the x^T tile at K 0, and its mask. KS > 1
        (K split over the tile's rows, ``_ks_offsets``): MMA column j = kr MR + m is row m of x at K
        kr BLOCK_K (rows m >= M and chunks kr >= KS read as 0); MR 0: BLOCK_M."""
        MRR: gl.constexpr = BLOCK_M if MR == 0 else MR
        xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, XL))
        j = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, XL))
        m = j % MRR
        kr = j // MRR
        ptrs = x_ptr + (m * stride_xm + kr * BLOCK_K)[None, :] + xk[:, None]
        return ptrs, ((m < M) & (kr < KS))[None, :]

    @gluon.jit
    def _natural_cols(acc):
        """``acc [128, BM]`` (MMA row i = tile column ``_tile_col(i)``) -> rows in column order, in a
        blocked layout of 4 adjacent columns per thread (through shared memory)."""
        BM: gl.constexpr = acc.shape[1]
        a = gl.reshape(acc, [2, 2, 2, 2, 2, 2, 2, BM])  # MMA row bits i6 .. i0, j
        a = gl.reshape(gl.permute(a, (1, 2, 4, 5, 6, 0, 3, 7)), [128, BM])  # tile column bits (``_tile_col``)
        return gl.convert_layout(a, gl.BlockedLayout([4, 1], [32, 1], [1, 4], [0, 1]))

    @gluon.jit
    def _tile_col(i):
        """Tile column (0..127) of MMA row i (inverse of ``_relabel_cols``)."""
        return ((i >> 5) & 1) * 64 + ((i >> 4) & 1) * 32 + (i & 7) * 4 + ((i >> 6) & 1) * 2 + ((i >> 3) & 1)

    @gluon.jit
    def _ks_offsets(t, off_n, N, G, KS: gl.constexpr, BLOCK_K: gl.constexpr, P: gl.constexpr):
        """For tile columns t: the element offsets of their words (word row 0 of the tile) and of their
        group's scale / zero (group row of the tile's first K). KS = 1: column off_n + t. KS > 1: the
        tile's rows hold CW = 128 / KS output columns x KS chunks of BLOCK_K consecutive K (tile
        column t = kr CW + c: column off_n + c, K chunk kr); needs KS BLOCK_K and G to divide one
        another (the launcher), so the chunk's group is the tile's plus kr BLOCK_K // G."""
        CW: gl.constexpr = 128 // KS
        n = off_n + t % CW
        kr = t // CW
        return n + kr * (BLOCK_K // P) * N, n + (kr * BLOCK_K // G) * N

    @gluon.jit
    def _higher_slice(x_ptr, ws_ptr, stride_xm, M, N, G, k_start, k1, off_n, WL: gl.constexpr,
                      XL: gl.constexpr, R: gl.constexpr, P: gl.constexpr, BLOCK_K: gl.constexpr,
                      BLOCK_M: gl.constexpr, KS: gl.constexpr, MR: gl.constexpr):
        """Start of a second or third slice (words from ws_ptr, its first word row): its x^T tile
        pointers and mask (XL, the slice's relabeling), word offsets, zero points 0 and its first two
        tiles."""
        x_ptrs, x_mask = _x_tile_ptrs(x_ptr, stride_xm, M, XL, BLOCK_K, BLOCK_M, KS, MR)
        w_off, _ = _ks_offsets(gl.arange(0, 128, layout=gl.SliceLayout(0, WL)), off_n, N, G, KS, BLOCK_K, P)
        z0 = gl.zeros([128], gl.float16, gl.SliceLayout(0, WL))
        w = _load_words(ws_ptr, N, k_start, w_off, WL, R, P)
        w1 = _load_words(ws_ptr, N, k1, w_off, WL, R, P)
        return ws_ptr, x_ptrs, x_mask, w_off, z0, w, w1

    @gluon.jit
    def _load_words(w_ptr, N, k0, w_off, WL: gl.constexpr, R: gl.constexpr, P: gl.constexpr):
        """Words ``[R, 128]`` of the K tile at k0 (WL) of one slice (w_ptr: its first word row; w_off:
        the columns' offsets, ``_ks_offsets``)."""
        r = gl.arange(0, R, layout=gl.SliceLayout(1, WL))
        return gl.load(w_ptr + (k0 // P + r)[:, None] * N + w_off[None, :])

    @gluon.jit
    def _load_high_bits(w_ptr, N, k0, wh_off, WL: gl.constexpr, R: gl.constexpr, P: gl.constexpr = 16,
                        HW: gl.constexpr = 1):
        """The high bits of a tile's codes ``[R, 128]`` in the layout of its lowest slice's words (WL, P codes
        a word; a 3-bit codebook's or uniform W3's 2-bit words, W5's / W6's 4-bit ones): from the next slice
        (HW bits a code, PH = 32 / HW codes a word), word row r's P codes have theirs at bits HW P (r % (PH /
        P)).. of its row k0 / PH + r / (PH / P) (wh_off: that slice's offsets from w_ptr, columns as
        ``_ks_offsets`` with PH codes per word), shifted down to bit 0 (arithmetic shift: the bits above HW P
        are not used)."""
        PH: gl.constexpr = 32 // HW
        PER: gl.constexpr = PH // P  # word rows per high-bit word
        r = gl.arange(0, R, layout=gl.SliceLayout(1, WL))
        v = gl.load(w_ptr + (k0 // PH + r // PER)[:, None] * N + wh_off[None, :])
        return v >> (HW * P * (r % PER))[:, None]

    @gluon.jit
    def _split_high_bits(w, z):
        """``_load_tile``'s words joined with their codes' high bits ``[R, 128, 2]`` -> the words and the high
        bits, both back in the words' layout (the parent of z's: the tile's zero points in column order), the
        high bits already column-relabeled (``_relabel_cols``) like the words will be."""
        WL: gl.constexpr = z.type.layout.parent
        w, wh = gl.split(w)
        return gl.convert_layout(w, WL), _relabel_cols(gl.convert_layout(wh, WL))

    @gluon.jit
    def _load_tile(w_ptr, s_ptr, z_ptr, N, G, k0, w_off, z_off, s_off, WL: gl.constexpr, R: gl.constexpr,
                   P: gl.constexpr, ZW: gl.constexpr = 0, SA: gl.constexpr = False, CB: gl.constexpr = 0,
                   G2: gl.constexpr = False, wh_off=0, HB: gl.constexpr = 0):
        """Words ``[R, 128]`` of the K tile at k0 (WL), the zero points of its group (columns in WL
        order, offsets z_off) and its scales (MMA rows, offsets s_off). ZW 1: the zero points as int32
        words of two f16 (z_off: ``_pair_offsets``), for ``_zero_halves``; ZW 2: the scales too (in
        column order: ``_cols_to_rows``). CB: codebook weights, no zero points (zeros in their place). G2
        (ZW 0, no SA): the tile holds groups g and g + 1, whose zero points and scales come joined as
        ``[C, 2]``. CB 2 (3-bit codebook): the words come joined with their codes' high bits ``[R, 128, 2]``
        (``_load_high_bits``), and so do uniform words with HB (the next slice's HB bits a code)."""
        w = _load_words(w_ptr, N, k0, w_off, WL, R, P)
        if CB == 2:
            w = gl.join(w, _load_high_bits(w_ptr, N, k0, wh_off, WL, R))
        elif HB > 0:
            w = gl.join(w, _load_high_bits(w_ptr, N, k0, wh_off, WL, R, P, HB))
        g = k0 // G
        if CB:
            z = gl.zeros_like(z_off).to(gl.float16)
            if G2:
                z = gl.join(z, z)
        elif G2:
            z = gl.join(gl.load(z_ptr + g * N + z_off), gl.load(z_ptr + (g + 1) * N + z_off))
        elif ZW:
            z = gl.load(z_ptr.to(gl.pointer_type(gl.int32)) + (g * N) // 2 + z_off)
        else:
            z = gl.load(z_ptr + g * N + z_off)
        if G2:
            s = gl.join(gl.load(s_ptr + g * N + s_off), gl.load(s_ptr + (g + 1) * N + s_off))
        elif ZW == 2:  # the scales too, at the zero points' (column) offsets
            s = gl.load(s_ptr.to(gl.pointer_type(gl.int32)) + (g * N) // 2 + z_off)
        elif SA:  # scales in column order, for the conversion (``_unpack_tile``'s SA)
            s = gl.load(s_ptr + g * N + z_off)
        else:
            s = gl.load(s_ptr + g * N + s_off)
        return w, z, s

    @gluon.jit
    def _cols_to_rows(v, L: gl.constexpr):
        """``[128]`` values of tile columns -> the same values at their MMA rows (``_relabel_cols``'s
        bit permutation; the owning threads do not change), layout L."""
        v = gl.reshape(v, [2, 2, 8, 2, 2])  # c64, c32, (c16 c8 c4), c2, c1
        return gl.convert_layout(gl.reshape(gl.permute(v, (3, 0, 1, 4, 2)), [128]), L)

    @gluon.jit
    def _x_at(i, x_ptrs, x_mask, k_start, SK: gl.constexpr, BL: gl.constexpr, W0: gl.constexpr,
              XW: gl.constexpr, x_all):
        """The B operand of tile i: from the whole x slice in shared memory (XW > 0: ``x_all``) or from
        global memory."""
        if XW > 0:
            BK: gl.constexpr = x_all.shape[1]
            BM: gl.constexpr = x_all.shape[2]
            return _x_from_tile(x_all.index(i).load(_x_layout(BK, BM, W0)), BL, W0)
        else:
            return _x_operand(x_ptrs + (k_start + i * SK), x_mask, BL, W0)

    @gluon.jit
    def _tile_acc(acc, w, z, s, xb, AL: gl.constexpr, MMA: gl.constexpr, W0: gl.constexpr, ZW: gl.constexpr,
                  ZL: gl.constexpr, CB: gl.constexpr = 0, base=0, G2: gl.constexpr = False,
                  HB: gl.constexpr = 0):
        """acc + s * (unpacked words of one tile @ xb): one single-slice tile of the main loop (CB:
        codebook words, ``base`` = ``_table_base(4)``; G2: two groups, ``_tile_g2``; HB: uniform words
        joined with their codes' high bits)."""
        zh, sr = _tile_zs(z, s, ZW, ZL, MMA)
        if G2:
            acc = acc + _tile_g2(w, zh, sr, xb, AL, MMA, W0, CB, base)
        else:
            part = mma_v2(_unpack_tile(w, zh, AL, W0, CB=CB, base=base, HB=HB), xb,
                          gl.zeros(acc.shape, gl.float32, MMA))
            acc = acc + part * _group_scale(sr, W0)[:, None]
        return acc

    @gluon.jit
    def _tile_g2(w, z, s, xb, AL: gl.constexpr, MMA: gl.constexpr, W0: gl.constexpr, CB: gl.constexpr, base):
        """One 128-K tile holding two groups (zero points z and scales s ``[C, 2]``, ``_load_tile``'s G2): the
        K halves (K' bit 6, word rows 0..R/2 and R/2..R; a register split of the A and B operands) run their
        own MMA chains, each scaled by its group's scale. Returns the scaled partial ``[128, BM]``."""
        a = _unpack_tile(w, z, AL, W0, CB=CB, base=base, G2=True)
        BK: gl.constexpr = a.shape[1]
        BM: gl.constexpr = xb.shape[1]
        BL: gl.constexpr = xb.type.layout
        a0, a1 = gl.split(gl.permute(gl.reshape(a, [128, 2, BK // 2]), (0, 2, 1)))
        x0, x1 = gl.split(gl.permute(gl.reshape(xb, [2, BK // 2, BM]), (1, 2, 0)))
        s0, s1 = gl.split(s)
        s0 = gl.convert_layout(s0, gl.SliceLayout(1, MMA))
        s1 = gl.convert_layout(s1, gl.SliceLayout(1, MMA))
        zero = gl.zeros([128, BM], gl.float32, MMA)
        p0 = mma_v2(gl.convert_layout(a0, AL), gl.convert_layout(x0, BL), zero)
        p1 = mma_v2(gl.convert_layout(a1, AL), gl.convert_layout(x1, BL), zero)
        return p0 * _group_scale(s0, W0)[:, None] + p1 * _group_scale(s1, W0)[:, None]

    @gluon.jit
    def _group_scale(sr, W0: gl.constexpr):
        """A tile's scales as float32 factors of its partial sums (W0 8: times 1 / ``MMA_W8_X_SCALE``)."""
        if W0 == 8:
            return sr.to(gl.float32) * _W8_X_UNSCALE
        return sr.to(gl.float32)

    @gluon.jit
    def _tile_zs(z, s, ZW: gl.constexpr, ZL: gl.constexpr, MMA: gl.constexpr):
        """A tile's zero points as f16 in column order (layout ZL) and its scales at the MMA rows, from
        ``_load_tile``'s ZW forms."""
        zh = _zero_halves(z, ZL) if ZW else z
        if ZW == 2:
            sr = _cols_to_rows(_zero_halves(s, ZL), gl.SliceLayout(1, MMA))
        else:
            sr = s
        return zh, sr

    @gluon.jit
    def _pair_offsets(z_off):
        """Element offsets ``[C]`` of f16 columns in adjacent pairs (even first) -> int32 word offsets
        ``[C / 2]`` of the pairs."""
        even, _ = gl.split(gl.reshape(z_off, [z_off.shape[0] // 2, 2]))
        return even // 2

    @gluon.jit
    def _zero_halves(zw, L: gl.constexpr):
        """int32 words ``[C / 2]`` of two f16 -> the f16 ``[C]`` (layout L; low half first). Loaded as
        words and split only where used: loaded as halves, the compiler packs each pair right after the
        loads (PRMT), i.e. waits for them in the iteration that issues them (s16-8 ncu: 16% of the
        M = 1 loop's stall samples)."""
        lo = (zw & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True)
        hi = (zw >> 16).to(gl.int16).to(gl.float16, bitcast=True)
        return gl.convert_layout(gl.reshape(gl.join(lo, hi), [zw.shape[0] * 2]), L)

    @gluon.jit
    def _unpack_tile(w, z, AL: gl.constexpr, W0: gl.constexpr, s=None, SA: gl.constexpr = False,
                     CB: gl.constexpr = 0, base=0, G2: gl.constexpr = False, HB: gl.constexpr = 0):
        """Exact bf16 ``q - z`` ``[128, BK]`` in the MMA's A layout from words ``[R, 128]`` (W0 8:
        float16). SA: ``s (q - z)`` rounded once, s the columns' scales (column order, as z). CB (4- or
        2-bit codebook words): bf16 ``codebook[q]`` from the shared table (``_lut_asm`` / ``_lut2_asm``;
        ``base`` = ``_table_base(W0)``), codes in natural K order, relabeled as x is
        (width 16 / 14). CB 2 (3-bit codebook codes): w ``[R, 128, 2]`` joins the 2-bit words and their
        codes' high bits (``_load_tile``), ``_lut3_asm`` looks the codes up in ``_fill_byte_table``'s. G2: z
        ``[C, 2]``, the first half of the word rows takes group 0's zero points, the second half group 1's.
        HB > 0 (uniform W3 / W5 / W6: W0 2 / 4 / 4, the next slice HB bits): w ``[R, 128, 2]`` joins the
        W0-bit words and their codes' high bits, converted together (``_mma_hb_asm``) into the W0-bit
        layout."""
        if CB:
            P: gl.constexpr = 32 // W0  # codes per word
            if CB == 2:  # 3-bit codes: the 2-bit words and their codes' high bits
                w, wh = _split_high_bits(w, z)
            if SA:
                sb, _ = gl.broadcast(s.to(gl.bfloat16)[None, :], w)
                sb = _relabel_cols(sb)
            w = _relabel_cols(w)
            lane = gl.zeros_like(w) + base
            if CB == 2 and SA:
                o = gl.inline_asm_elementwise(_lut_word_asm(3, True), "=h," * P + "r,r,r,h",
                                              [w, wh, lane, sb], dtype=(gl.bfloat16,) * P, is_pure=True,
                                              pack=1)
            elif CB == 2:
                o = gl.inline_asm_elementwise(_lut_word_asm(3, False), "=h," * P + "r,r,r", [w, wh, lane],
                                              dtype=(gl.bfloat16,) * P, is_pure=True, pack=1)
            elif SA:
                o = gl.inline_asm_elementwise(_lut_word_asm(W0, True), "=h," * P + "r,r,h", [w, lane, sb],
                                              dtype=(gl.bfloat16,) * P, is_pure=True, pack=1)
            else:
                o = gl.inline_asm_elementwise(_lut_word_asm(W0, False), "=h," * P + "r,r", [w, lane],
                                              dtype=(gl.bfloat16,) * P, is_pure=True, pack=1)
            if W0 == 2:  # natural code order: o[j] = code j
                v = gl.join(_join8(o[0], o[2], o[4], o[6], o[8], o[10], o[12], o[14]),
                            _join8(o[1], o[3], o[5], o[7], o[9], o[11], o[13], o[15]))
                a = _relabel_cb2(_words_tile(v, w.shape[0], 128, 16))
            else:
                a = _swap_k15(_words_tile(_join8(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]), w.shape[0],
                                          128, 8))
            a = gl.convert_layout(a, AL)
        else:
            if G2:  # word rows [0, R/2) hold group 0, [R/2, R) group 1
                z0, z1 = gl.split(z)
                ZC: gl.constexpr = gl.SliceLayout(0, w.type.layout)
                zb0 = (-(gl.convert_layout(z0, ZC).to(gl.float32) + 128.0)).to(gl.bfloat16)
                zb1 = (-(gl.convert_layout(z1, ZC).to(gl.float32) + 128.0)).to(gl.bfloat16)
                zb0, _ = gl.broadcast(zb0[None, :], w)
                zb1, _ = gl.broadcast(zb1[None, :], w)
                rows = gl.arange(0, w.shape[0], layout=gl.SliceLayout(1, w.type.layout))
                zb = gl.where((rows < w.shape[0] // 2)[:, None], zb0, zb1)
            elif W0 == 8:
                zb = (z.to(gl.float32) + 1024.0).to(gl.float16)[None, :]
            else:
                zb = (-(z.to(gl.float32) + 128.0)).to(gl.bfloat16)[None, :]
            if HB > 0:  # the lowest slice's words and their codes' high bits
                w, wh = _split_high_bits(w, z)
            zb, _ = gl.broadcast(zb, w)
            if SA:
                sb, _ = gl.broadcast(s.to(zb.dtype)[None, :], w)
                sb = _relabel_cols(sb)
            w = _relabel_cols(w)
            zb = _relabel_cols(zb)
            P: gl.constexpr = 32 // W0
            if HB > 0 and SA:
                o = gl.inline_asm_elementwise(_word_asm(W0 + HB, True), "=h," * P + "r,r,h,h",
                                              [w, wh, zb, sb], dtype=(zb.dtype,) * P, is_pure=True, pack=1)
            elif HB > 0:
                o = gl.inline_asm_elementwise(_word_asm(W0 + HB, False), "=h," * P + "r,r,h", [w, wh, zb],
                                              dtype=(zb.dtype,) * P, is_pure=True, pack=1)
            elif SA:
                o = gl.inline_asm_elementwise(_word_asm(W0, True), "=h," * P + "r,h,h", [w, zb, sb],
                                              dtype=(zb.dtype,) * P, is_pure=True, pack=1)
            else:
                o = gl.inline_asm_elementwise(_word_asm(W0, False), "=h," * P + "r,h", [w, zb],
                                              dtype=(zb.dtype,) * P, is_pure=True, pack=1)
            if W0 == 8:
                v = gl.join(gl.join(o[0], o[2]), gl.join(o[1], o[3]))
            elif W0 == 4:
                v = _join8(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7])
            elif W0 == 1:
                v = gl.join(gl.join(_join8(o[0], o[4], o[8], o[12], o[16], o[20], o[24], o[28]),
                                    _join8(o[2], o[6], o[10], o[14], o[18], o[22], o[26], o[30])),
                            gl.join(_join8(o[1], o[5], o[9], o[13], o[17], o[21], o[25], o[29]),
                                    _join8(o[3], o[7], o[11], o[15], o[19], o[23], o[27], o[31])))
            else:
                v = gl.join(_join8(o[0], o[2], o[4], o[6], o[8], o[10], o[12], o[14]),
                            _join8(o[1], o[3], o[5], o[7], o[9], o[11], o[13], o[15]))
            a = _words_tile(v, w.shape[0], 128, 32 // W0)
            a = gl.convert_layout(_relabel_a(a, W0), AL)
        return a

    @gluon.jit
    def _gdc_wait():
        """PDL: wait until the previous grid of the stream completed (its writes visible)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        """PDL: let the next grid of the stream start (it waits in its own ``_gdc_wait``)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _stamp(ts_ptr, slot: gl.constexpr):
        """Timeline (benchmarks/bench_gemv_timeline.py): the global timer (ns) into ``ts_ptr[program, slot]``
        (8 int64 per program, program = pid0 + pid1 * grid0); slot 7 also gets the SM id at slot 0's call."""
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False,
                                      pack=1)
        row = ts_ptr + (gl.program_id(0) + gl.program_id(1) * gl.num_programs(0)) * 8
        gl.store(row + slot, t)
        if slot == 0:
            sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=False,
                                           pack=1)
            gl.store(row + 7, sm.to(gl.int64))

    @gluon.constexpr_function
    def _partial_smem_layout(cluster):
        """Row-major, unswizzled: element (r, c) of a ``[BN, BM]`` float32 tile at byte 4 (r BM + c)."""
        return gl.SwizzledSharedLayout(1, 1, 1, [1, 0], cga_layout=_cga(cluster))

    @gluon.constexpr_function
    def _dsmem_load_asm(rank):
        """PTX: the float32 at shared byte offset ``$1`` (from the kernel's shared base) of cluster
        CTA ``rank``."""
        return ("{ .reg .b32 a; mov.u32 a, global_smem; add.u32 a, a, $1; "
                f"mapa.shared::cluster.u32 a, a, {int(rank)}; ld.shared::cluster.f32 $0, [a]; }}")

    @gluon.jit
    def _cluster_rank():
        """This CTA's rank in its cluster (0 .. CLUSTER - 1)."""
        return gl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r", [], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _cluster_barrier():
        """All threads of all CTAs of the cluster: shared-memory writes before it (release) are
        visible to reads after it (acquire) in every CTA of the cluster."""
        gl.inline_asm_elementwise("barrier.cluster.arrive.release.aligned; "
                                  "barrier.cluster.wait.acquire.aligned; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _cluster_sum(acc, rank, CLUSTER: gl.constexpr):
        """Split-K over the CTAs of a cluster without global memory: every CTA puts its partial
        ``acc [BN, BM]`` in its shared memory, CTA 0 adds them in rank order (the same bits every
        call) through distributed shared memory; the sum is valid in CTA 0 only. The buffer must be
        the kernel's only shared allocation (offset 0; the launcher checks the kernel's size)."""
        BN: gl.constexpr = acc.shape[0]
        BM: gl.constexpr = acc.shape[1]
        L: gl.constexpr = acc.type.layout
        buf = gl.allocate_shared_memory(gl.float32, [BN, BM], _partial_smem_layout(CLUSTER))
        buf.store(acc)
        _cluster_barrier()
        r = gl.arange(0, BN, layout=gl.SliceLayout(1, L))
        c = gl.arange(0, BM, layout=gl.SliceLayout(0, L))
        offs = (r[:, None] * BM + c[None, :]) * 4
        tot = gl.zeros([BN, BM], gl.float32, L)
        if rank == 0:
            for j in gl.static_range(CLUSTER):
                tot += gl.inline_asm_elementwise(_dsmem_load_asm(j), "=f,r", [offs], dtype=gl.float32,
                                                 is_pure=False, pack=1)
        _cluster_barrier()  # no CTA leaves (its shared memory) before CTA 0 has read it
        return tot

    @gluon.jit(do_not_specialize=["M", "n_iters", "split_k", "defer_sum"])
    def _quant_gemv_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, G, stride_xm,
                               stride_ym, k_per_split, n_iters, split_k, W0: gl.constexpr,
                               BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,
                               PDL: gl.constexpr, CLUSTER: gl.constexpr = 1, DIAG: gl.constexpr = 0,
                               ACC: gl.constexpr = False, WB: gl.constexpr = 0, WC: gl.constexpr = 0,
                               KS: gl.constexpr = 1, MR: gl.constexpr = 0,
                               SUM_LOADS: gl.constexpr = 8, XS: gl.constexpr = 0, XW: gl.constexpr = 0,
                               ZW: gl.constexpr = 0, U2: gl.constexpr = False, SA: gl.constexpr = False,
                               CB: gl.constexpr = 0, XP: gl.constexpr = False, G2: gl.constexpr = False,
                               HB: gl.constexpr = 0, defer_sum=0, ts_ptr=None, TS: gl.constexpr = False):
        """Tile ``[BLOCK_M, 128]`` of y for one K split of ``k_per_split`` (= n_iters tiles of
        BLOCK_K; BLOCK_K divides G or G divides... one group per tile). x ``[M, K]`` bf16 (row stride
        stride_xm), words ``[K / P, N]`` int32, scales / zeros ``[K / G, N]`` f16 (integer zeros),
        y ``[M, N]``. Per tile: exact ``q - z`` weights, one MMA chain into zeroed partials, then
        ``acc += s * part`` in float32. SPLIT: float32 partials in ws, summed by the tile's last
        program. CLUSTER > 1 (launched with ``num_ctas=CLUSTER``, grid ``(N / 128,)``): the K splits of
        a tile are the CTAs of one cluster (rank = split) and are summed through distributed shared
        memory instead (SPLIT off, no workspace). PDL: the first two tiles' weights are requested
        before waiting for the previous kernel (which may write x). DIAG (benchmarks only, wrong
        results): bit 0 reuses the first x tile for every tile (no x load in the loop), bit 1 stores
        the partials without the split-K sum, bit 2 loads the first tile's words for every tile (cache
        hits: the loop's own cost without the weight stream). ACC: every program adds its partial into the
        float32 accumulator ws_ptr (``_store_tile``'s ACC; anybit/layers/pending.py). ``defer_sum`` != 0 (with
        SPLIT; a run-time value, not specialized): the partials only stored, for split_k_sum.py's kernel to
        add. At run time, so the kernel is the same compile as the last-program sum: as a constexpr, W2 at
        BLOCK_M 8 compiled to 94 instead of 120 registers and a longer, slower loop (s30-3, offline sm_90: 316
        against 309 instructions; M 4 15.3 against 13.4 us).

        WB, WC (widths of a second and third slice, 0 = none; anybit/quant/format.py: 3 = 2+1, 5 = 4+1,
        6 = 4+2, 7 = 4+2+1): the code is ``q = q0 + 2^W0 qb + 2^(W0+WB) qc``, so ``s (q - z)`` = ``s ((q0
        - z) + 2^W0 qb + ...)``: each slice is unpacked on its own (zero point on the first only) and
        multiplied by its own relabeled copy of x times 2^shift (exact) in one MMA chain per tile.

        KS > 1 (K split inside the program, for M <= MR with KS MR <= BLOCK_M): the 128 MMA rows are
        CW = 128 / KS output columns x KS chunks of BLOCK_K consecutive K, and MMA column kr MR + m is x
        row m at chunk kr, so one iteration covers KS BLOCK_K of K (k_per_split counts those) and the
        entries with matching chunks are summed at the end (``_ks_sum``, through shared memory once per
        program). Fewer output columns per program give enough programs without split-K (M = 1).

        XS > 1 (not with CLUSTER): the x^T tiles come through a ring of XS shared-memory slots, copied
        (``cp.async``, by all threads) XS - 1 tiles ahead, one CTA barrier per tile; each slice reads
        its operand from the shared tile. XS 0: every warp loads its x tile from global memory in the
        iteration that uses it, so the loop waits for an L2 round trip per tile (s16-1: 28% of the
        warps' stall samples at M 1 and 16). XW > 0 (n_iters <= XW, not with XS or CLUSTER): the
        program's whole x slice (n_iters tiles) is copied into shared memory before the loop (one wait,
        one barrier), and the loop only reads it: no barrier and no copy per tile. ZW 1: zero points
        loaded as int32 words of two f16 (``_zero_halves``; 4-byte aligned zeros), ZW 2: the scales too
        (4-byte aligned scales). U2 (single slice, no XS, no DIAG): the loop takes two tiles per
        iteration, each with its own word buffer refilled right after its unpacking (``_tile_acc``), so
        no buffer is moved between iterations (the three-buffer loop's moves wait for the loads). SA
        (BLOCK_M 32 / 64, no U2): the conversion applies the scale (``s (q - z)`` rounded once in bf16,
        scales loaded in column order) and every MMA accumulates straight into acc: no partial tile and
        no float32 scaling per tile, which at these BLOCK_M would double the accumulator registers.

        CB 1 (W0 4 or 2, single slice, no XS / XW / CLUSTER; with SA the table values are scaled in the
        conversion; CB 0: uniform weights): codebook weights ``codebook[q] s``; z_ptr is the float32
        codebook ``[2^W0]``. Each program first writes its table to shared memory (W0 4: code pairs by
        byte, ``_fill_lut``; W0 2: 4 codes by byte, ``_fill_byte_table``); a word's codes are then 4 shared
        loads (``_lut_asm`` / ``_lut2_asm``), the codes in natural order (x relabeled by ``_swap_k15`` /
        ``_relabel_cb2``). CB 2 (W0 2, WB 0): 3-bit codes, the 1-bit slice's high bits (at row offset
        K / 32 W0 of the words) loaded with each tile's 2-bit words and merged in the lookup
        (``_fill_byte_table``, ``_lut3_asm``).
        XP (with U2, x from global memory): each tile's x is loaded with its words, two tiles ahead, instead
        of in the iteration that uses it. G2 (single slice, BLOCK_M <= 16, no ZW): BLOCK_K = 2 G, the tile's
        two groups each get their zero points and scales (``_load_tile`` joins them) and their own MMA chain
        (``_tile_g2``). HB > 0 (uniform W3 / W5 / W6 as W0 2 / 4 / 4, WB 0; HB the next slice's width): each
        tile's W0-bit words come joined with their codes' high bits from the next slice, as for CB 2, and are
        converted together (``_mma_hb_asm``): one MMA chain and one x operand (the W0-bit slice's) instead of
        a slice each. TS (benchmarks only): ``_stamp`` writes the global timer at entry (slot 0), after the
        PDL wait (1), once x is in shared memory (2), after the loop (3) and after the stores (4)."""
        if TS:
            _stamp(ts_ptr, 0)
        if CB == 2:  # the table first: it must sit at shared offset 0 (3-bit codes)
            _fill_byte_table(z_ptr, True)
            base = _table_base(3)
        elif CB and W0 == 2:
            _fill_byte_table(z_ptr)
            base = _table_base(2)
        elif CB:
            _fill_lut(z_ptr)
            base = _table_base(4)
        else:
            base = 0
        WX: gl.constexpr = W0 + 12 * (CB > 0)  # x's relabeling: 16 / 14 = 4- / 2- (and 3-) bit codebook words
        P: gl.constexpr = 32 // W0
        R: gl.constexpr = BLOCK_K // P
        PB: gl.constexpr = 32 // WB if WB > 0 else 32
        PC: gl.constexpr = 32 // WC if WC > 0 else 32
        RB: gl.constexpr = BLOCK_K // PB
        RC: gl.constexpr = BLOCK_K // PC
        pid = gl.program_id(0)  # with CLUSTER: the cluster's index
        if CLUSTER > 1:
            pid_k = _cluster_rank()
        else:
            pid_k = gl.program_id(1)
        CW: gl.constexpr = 128 // KS
        SK: gl.constexpr = KS * BLOCK_K  # K per iteration
        off_n = pid * CW
        MMA: gl.constexpr = _mma_layout(CLUSTER)
        AL: gl.constexpr = gl.DotOperandLayout(0, MMA, 8)
        BL: gl.constexpr = gl.DotOperandLayout(1, MMA, 8)
        WL: gl.constexpr = _words_layout(R, 128, CLUSTER)
        x_ptrs, x_mask = _x_tile_ptrs(x_ptr, stride_xm, M, _x_layout(BLOCK_K, BLOCK_M, W0, CLUSTER), BLOCK_K,
                                      BLOCK_M, KS, MR)
        t = gl.arange(0, 128, layout=gl.SliceLayout(0, WL))
        w_off, z_off = _ks_offsets(t, off_n, N, G, KS, BLOCK_K, P)
        if CB == 2 or HB > 0:  # the high bits' slice: its word offsets (32 / HB codes a word) from w_ptr
            PH: gl.constexpr = 32 // HB if HB > 0 else 32
            wh_off = (K // 32 * W0) * N + _ks_offsets(t, off_n, N, G, KS, BLOCK_K, PH)[0]
        else:
            wh_off = 0
        ZL: gl.constexpr = z_off.type.layout
        if ZW:
            z_off = _pair_offsets(z_off)
        _, s_off = _ks_offsets(_tile_col(gl.arange(0, 128, layout=gl.SliceLayout(1, MMA))), off_n, N, G, KS,
                               BLOCK_K, P)
        k_start = pid_k * k_per_split
        acc = gl.zeros([128, BLOCK_M], gl.float32, MMA)
        # two tiles in flight: the loads of tile i + 2 are issued in iteration i (the compiler sinks
        # them to the end of the iteration, so a distance of one would wait for each tile)
        w, z, s = _load_tile(w_ptr, s_ptr, z_ptr, N, G, k_start, w_off, z_off, s_off, WL, R, P, ZW, SA, CB,
                             G2, wh_off, HB)
        k1 = k_start + gl.minimum(1, n_iters - 1) * SK
        w1, z1, s1 = _load_tile(w_ptr, s_ptr, z_ptr, N, G, k1, w_off, z_off, s_off, WL, R, P, ZW, SA, CB, G2,
                                wh_off, HB)
        if WB > 0:  # the higher slices: words only (zero point 0), x relabeled for their width
            WLB: gl.constexpr = _words_layout(RB, 128, CLUSTER)
            wb_ptr, xb_ptrs, xb_mask, wb_off, zb0, wb, wb1 = _higher_slice(
                x_ptr, w_ptr + (K // 32 * W0) * N, stride_xm, M, N, G, k_start, k1, off_n, WLB,
                _x_layout(BLOCK_K, BLOCK_M, WB, CLUSTER), RB, PB, BLOCK_K, BLOCK_M, KS, MR)
        if WC > 0:
            WLC: gl.constexpr = _words_layout(RC, 128, CLUSTER)
            wc_ptr, xc_ptrs, xc_mask, wc_off, zc0, wc, wc1 = _higher_slice(
                x_ptr, w_ptr + (K // 32 * (W0 + WB)) * N, stride_xm, M, N, G, k_start, k1, off_n, WLC,
                _x_layout(BLOCK_K, BLOCK_M, WC, CLUSTER), RC, PC, BLOCK_K, BLOCK_M, KS, MR)
        if PDL:
            _gdc_launch_dependents()
            _gdc_wait()
        if TS:
            _stamp(ts_ptr, 1)
        if XS > 0:  # the first XS - 1 x tiles into the ring (past the end: zero-filled, no read)
            xr_ptrs, xr_mask = _x_tile_ptrs(x_ptr, stride_xm, M, _x_copy_layout(BLOCK_K, BLOCK_M, CLUSTER),
                                            BLOCK_K, BLOCK_M, KS, MR)
            x_ring = gl.allocate_shared_memory(gl.bfloat16, [XS, BLOCK_K, BLOCK_M],
                                               _x_smem_layout(W0, BLOCK_K, CLUSTER))
            for j in gl.static_range(XS - 1):
                async_copy.async_copy_global_to_shared(x_ring.index(j), xr_ptrs + (k_start + j * SK),
                                                       xr_mask & (j < n_iters))
                async_copy.commit_group()
        if XW > 0:  # the whole slice: n_iters tiles of x^T, then one wait and one barrier
            xw_ptrs, xw_mask = _x_tile_ptrs(x_ptr, stride_xm, M, _x_copy_layout(BLOCK_K, BLOCK_M, CLUSTER),
                                            BLOCK_K, BLOCK_M, KS, MR)
            x_all = gl.allocate_shared_memory(gl.bfloat16, [XW, BLOCK_K, BLOCK_M],
                                              _x_smem_layout(W0, BLOCK_K, CLUSTER))
            # (the compiler puts a CTA barrier after each copy: it cannot tell the tiles apart; a single
            # copy of all tiles ([XW, BK, BM], one more pointer dimension) crashes Triton 3.6's lowering)
            for j in range(n_iters):
                async_copy.async_copy_global_to_shared(x_all.index(j), xw_ptrs + (k_start + j * SK), xw_mask)
            async_copy.commit_group()
            async_copy.wait_group(0)
            gl.thread_barrier()
        if TS:
            _stamp(ts_ptr, 2)
        x_all_arg = x_all if XW > 0 else x_ptr
        if DIAG & 1:
            xb = _x_operand(x_ptrs + k_start, x_mask, BL, WX)
        if U2:  # unrolled by two, one word buffer per half, refilled right after its tile's unpacking
            if XP:  # x of the first two tiles now; later ones with their tile's words (two tiles ahead)
                xa = _x_at(0, x_ptrs, x_mask, k_start, SK, BL, WX, XW, x_all_arg)
                xb1 = _x_at(gl.minimum(1, n_iters - 1), x_ptrs, x_mask, k_start, SK, BL, WX, XW, x_all_arg)
            for i0 in range(0, n_iters, 2):
                if XP:
                    xt = xa
                else:
                    xt = _x_at(i0, x_ptrs, x_mask, k_start, SK, BL, WX, XW, x_all_arg)
                acc = _tile_acc(acc, w, z, s, xt, AL, MMA, W0, ZW, ZL, CB, base, G2, HB)
                ka = k_start + gl.minimum(i0 + 2, n_iters - 1) * SK
                w, z, s = _load_tile(w_ptr, s_ptr, z_ptr, N, G, ka, w_off, z_off, s_off, WL, R, P, ZW, CB=CB,
                                     G2=G2, wh_off=wh_off, HB=HB)
                if XP:
                    xa = _x_at(gl.minimum(i0 + 2, n_iters - 1), x_ptrs, x_mask, k_start, SK, BL, WX, XW,
                               x_all_arg)
                if i0 + 1 < n_iters:
                    if XP:
                        xt = xb1
                    else:
                        xt = _x_at(i0 + 1, x_ptrs, x_mask, k_start, SK, BL, WX, XW, x_all_arg)
                    acc = _tile_acc(acc, w1, z1, s1, xt, AL, MMA, W0, ZW, ZL, CB, base, G2, HB)
                    kb = k_start + gl.minimum(i0 + 3, n_iters - 1) * SK
                    w1, z1, s1 = _load_tile(w_ptr, s_ptr, z_ptr, N, G, kb, w_off, z_off, s_off, WL, R, P, ZW,
                                            CB=CB, G2=G2, wh_off=wh_off, HB=HB)
                    if XP:
                        xb1 = _x_at(gl.minimum(i0 + 3, n_iters - 1), x_ptrs, x_mask, k_start, SK, BL, WX, XW,
                                    x_all_arg)
        else:
            for i in range(n_iters):
                k0 = k_start + i * SK
                k2 = k_start + gl.minimum(i + 2, n_iters - 1) * SK  # past the end: reload the last tile
                if DIAG & 4:  # every tile's words are the first tile's (cache hits): the loop without DRAM
                    k2 = k_start
                w2, z2, s2 = _load_tile(w_ptr, s_ptr, z_ptr, N, G, k2, w_off, z_off, s_off, WL, R, P, ZW, SA,
                                        CB, G2, wh_off, HB)
                if WB > 0:
                    wb2 = _load_words(wb_ptr, N, k2, wb_off, WLB, RB, PB)
                if WC > 0:
                    wc2 = _load_words(wc_ptr, N, k2, wc_off, WLC, RC, PC)
                if XS > 0:  # tile i has landed (own copies) and every thread is done with slot i - 1
                    async_copy.wait_group(XS - 2)
                    gl.thread_barrier()
                    x_tile = x_ring.index(i % XS)
                    if DIAG & 1 == 0:
                        xb = _x_from_tile(x_tile.load(_x_layout(BLOCK_K, BLOCK_M, W0, CLUSTER)), BL, W0)
                    # tile i + XS - 1 into the slot of tile i - 1 (past the end: zero-filled, no read)
                    kn = k_start + (i + XS - 1) * SK
                    async_copy.async_copy_global_to_shared(x_ring.index((i + XS - 1) % XS), xr_ptrs + kn,
                                                           xr_mask & (i + XS - 1 < n_iters))
                    async_copy.commit_group()
                elif XW > 0:
                    x_tile = x_all.index(i)
                    if DIAG & 1 == 0:
                        xb = _x_from_tile(x_tile.load(_x_layout(BLOCK_K, BLOCK_M, W0, CLUSTER)), BL, W0)
                elif DIAG & 1 == 0:
                    xb = _x_operand(x_ptrs + k0, x_mask, BL, WX)
                zh, sr = _tile_zs(z, s, ZW, ZL, MMA)
                if SA:  # scaled weights: straight into the accumulator
                    part = mma_v2(_unpack_tile(w, zh, AL, W0, sr, True, CB, base, HB=HB), xb, acc)
                elif G2:  # two groups: their chains scaled here
                    part = _tile_g2(w, zh, sr, xb, AL, MMA, W0, CB, base)
                else:
                    part = mma_v2(_unpack_tile(w, zh, AL, W0, CB=CB, base=base, HB=HB), xb,
                                  gl.zeros([128, BLOCK_M], gl.float32, MMA))
                if WB > 0:
                    if XS > 0 or XW > 0:
                        xbb = _x_from_tile(x_tile.load(_x_layout(BLOCK_K, BLOCK_M, WB, CLUSTER)), BL, WB,
                                           1 << W0)
                    else:
                        xbb = _x_operand(xb_ptrs + k0, xb_mask, BL, WB, 1 << W0)
                    part = mma_v2(_unpack_tile(wb, zb0, AL, WB, sr, SA), xbb, part)
                    wb = wb1
                    wb1 = wb2
                if WC > 0:
                    if XS > 0 or XW > 0:
                        xbc = _x_from_tile(x_tile.load(_x_layout(BLOCK_K, BLOCK_M, WC, CLUSTER)), BL, WC,
                                           1 << (W0 + WB))
                    else:
                        xbc = _x_operand(xc_ptrs + k0, xc_mask, BL, WC, 1 << (W0 + WB))
                    part = mma_v2(_unpack_tile(wc, zc0, AL, WC, sr, SA), xbc, part)
                    wc = wc1
                    wc1 = wc2
                if SA:
                    acc = part
                elif G2:
                    acc += part
                else:
                    acc += part * _group_scale(sr, W0)[:, None]
                w, z, s = w1, z1, s1
                w1, z1, s1 = w2, z2, s2
        if TS:
            _stamp(ts_ptr, 3)
        if XS > 0:  # no copy may land in the ring after the loop (the epilogue may reuse its memory)
            async_copy.wait_group(0)
        if CB:  # the table's reads (inline PTX, unseen by the compiler, which counts the table dead after its
            # store) end in every warp before the epilogue's shared scratch, which overlaps it (s24-2: without
            # this barrier repeated calls differed in the last bits)
            gl.thread_barrier()
        if SA and W0 == 8:  # x entered scaled by MMA_W8_X_SCALE
            acc = acc * _W8_X_UNSCALE
        if CLUSTER > 1:  # the sum is in CTA 0, whose stores are the only ones (replicated layout)
            acc = _cluster_sum(acc, pid_k, CLUSTER)
        if KS > 1:
            acc = _ks_sum(acc, KS, MR)
            cols = off_n + gl.arange(0, CW, layout=gl.SliceLayout(1, acc.type.layout))
        elif SA:  # wide tiles: natural column order, 4 adjacent columns per thread (vector stores, fewer
            # address registers in the split-K sum: in the MMA layout it spilled at BLOCK_M 64)
            acc = _natural_cols(acc)
            cols = off_n + gl.arange(0, 128, layout=gl.SliceLayout(1, acc.type.layout))
        else:
            cols = off_n + _tile_col(gl.arange(0, 128, layout=gl.SliceLayout(1, MMA)))
        _store_tile(acc, y_ptr, ws_ptr, lock_ptr, M, N, stride_ym, split_k, 0, cols, pid, pid_k,
                    SPLIT and DIAG & 2 == 0, SUM_LOADS=SUM_LOADS, ACC=ACC, defer_rt=defer_sum)
        if TS:
            _stamp(ts_ptr, 4)


_INT_ZEROS: dict = {}  # id(zeros) -> (weakref, version, bool)


def integer_zeros(packed: PackedWeight) -> bool:
    """Whether every zero point is an integer in [0, 2^b) (RTN, GPTQ): the exact ``q - z`` of this
    kernel needs it. Cached per zeros tensor and its in-place version; computed outside graph
    capture (the engine runs each layer once before capturing)."""
    zeros = packed.zeros
    hit = _INT_ZEROS.get(id(zeros))
    if hit is not None and hit[0]() is zeros and hit[1] == zeros._version:
        return hit[2]
    if zeros.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    ok = zeros_are_codes(zeros, packed.bits)
    for k in [k for k, v in _INT_ZEROS.items() if v[0]() is None]:
        del _INT_ZEROS[k]
    _INT_ZEROS[id(zeros)] = (weakref.ref(zeros), zeros._version, ok)
    return ok


def mma_applies(packed: PackedWeight, M: int, x: torch.Tensor) -> bool:
    """Whether this path can run the call: CUDA sm_80+, bf16 x (unit inner stride), 1 <= M <= 64, a
    uniform weight of 1..8 bits (slices of 1, 2, 4 and 8 bits) with integer zero points, or a 4-bit
    codebook weight (nf4 / fp4 / learned) or a 2- or 3-bit one (learned) at M <= ``MMA_CB_MAX_M``
    (``MMA_CB_BITS``), N a multiple of 128, K and the
    group size multiples of 64 (128 with a 1-bit slice: its words hold 32 K), contiguous words; M <= 32
    for widths with a 1-bit slice."""
    if gluon is None or _INTERPRET or not x.is_cuda or x.dtype != torch.bfloat16 or not 1 <= M <= MMA_MAX_M:
        return False
    cb = packed.fmt != "uniform"
    table = packed.codebook
    if cb and (packed.bits not in MMA_CB_BITS or table is None or table.dtype != torch.float32
               or table.numel() != 2 ** packed.bits or M > MMA_CB_MAX_M):
        return False
    if not cb and (packed.bits not in MMA_BITS or packed.zeros is None):
        return False
    kmul = 128 if 1 in SLICES[packed.bits] else 64
    if M > 32 and 1 in SLICES[packed.bits]:  # BLOCK_M 64 with 128-K tiles spills (offline sm_90, s23)
        return False
    if packed.out_features % 128 or packed.in_features % kmul or packed.group_size % kmul:
        return False
    q = packed.qweight
    if q.stride(1) != 1 or q.stride(0) != packed.out_features or x.stride(1) != 1:
        return False
    if packed.scales.dtype != torch.float16 or (not cb and packed.zeros.dtype != torch.float16):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 8 and (cb or integer_zeros(packed))


# Programs per SM assumed by the split count, by BLOCK_M: what the registers allow (offline sm_90, s22:
# 124-128 at BLOCK_M 8; 222-228 at BLOCK_M 16 for W2/3/4/6/7, so 2 fit, not the 3 assumed before). With 3,
# 6144x4096 at M 9-16 took split 8 (384 programs, two waves on 264 slots) and lost to the wgmma kernel; at
# split 4 (one wave) it wins (H100 s22-10, quant_matmul_smallk_s22_10, M 16 us: W4 12.8 against 15.3, W3
# 15.6 against 20.7, W6 17.2 against 22.2). The larger shapes keep their splits.
# Codebook widths with a shared table: 2 and 4 bits (a byte holds whole codes) and 3 bits (2 + 1 slices, the
# high bits merged at the lookup, the kernel's CB 2; env ANYBIT_MMA_CB3=0: the generic kernels). H100 s26-1
# (quant_codebook_3bit_s26_1, learned g128, x cuBLAS on 4096x14336 / 14336x4096 / 6144x4096, generic kernels
# in brackets): M = 1 1.71 / 2.35 / 2.22 (0.75 / 0.64 / 0.85), M 4 2.33 / 2.17 / 1.87 (0.44 / 0.38 / 0.45),
# M 16 1.84 / 1.63 / 1.35, M 32 1.61 / 1.49 / 1.09; uniform W3 2.81 / 2.83 / 2.43 at M = 1, level at M 4-32.
MMA_CB3 = os.environ.get("ANYBIT_MMA_CB3", "1") != "0"
MMA_CB_BITS = (2, 3, 4) if MMA_CB3 else (2, 4)
# 3-bit codebooks at BLOCK_M 8 compile to 132 registers with split-K (offline sm_90), so 3 programs per SM
# where the split count assumes 4: 4096x14336 at M = 1 (split 2, 512 programs) ran two waves, 26.4 us in s26-1
# against 18.6 on 14336x4096 (one split). Capped at 128 they take 126 registers, no spills, 530 loop
# instructions per tile against 524. (4 programs of 128 threads at 128 registers: MMA_PROGRAMS_PER_SM[8].)
MMA_CB3_MAX_REGISTERS = 128
# Uniform 3-bit weights (2 + 1 slices) with the 1-bit slice's high bits joined to the 2-bit words and
# converted with them (the kernel's HB, ``_mma_hb_asm``): one MMA chain and one x operand per tile instead of
# one per slice.
# Env ANYBIT_MMA_W3_HB=0: the two slices. H100 s26-4 (quant_w3_s26_4, us, two slices / merged on 4096x14336 /
# 14336x4096 / 6144x4096): M 16 25.4 / 21.3, 27.0 / 22.2, 15.5 / 13.4; M 32 49.9 / 26.2, 52.8 / 26.6, 19.3 /
# 18.0; pending sums M 16 28.4 / 22.2, 31.4 / 24.8, 13.3 / 10.5. At BLOCK_M 8 merged takes 165 registers
# (offline sm_90; 3 programs per SM): see ``bm8_register_cap``.
MMA_W3_HB = os.environ.get("ANYBIT_MMA_W3_HB", "1") != "0"
# W5 (4 + 1) and W6 (4 + 2) merge the same way (``MMA_HB_SLICES``; env ANYBIT_MMA_HB56=0: off), but at
# BLOCK_M 8 (164-168 registers offline, 3 programs per SM; capped at 128 they were slower still) only where
# the grid fits 3 programs per SM (``hb_default``). H100 s26-7 (quant_hb_w5_s26_7 / _w6_, us, two slices /
# merged on 4096x14336 / 14336x4096 / 6144x4096): W5 M 16 29.5 / 24.1, 30.5 / 24.7, 18.1 / 14.8, pending
# 31.0 / 20.9, 33.7 / 21.0, 21.0 / 11.6; W6 M 16 30.3 / 26.0, 31.5 / 27.7, 17.8 / 14.8, pending 30.6 / 22.6,
# 34.3 / 25.0, 14.9 / 12.1; M 32 pending W5 41.8 / 26.2, 46.4 / 28.4, 23.9 / 16.1, W6 50.2 / 39.0, 56.7 /
# 44.8, 17.4 / 14.1; M 4 W5 21.9 / 27.5, 22.2 / 26.3, but 13.5 / 12.0 (6144x4096: 384 programs), W6 23.9 /
# 28.6, 24.9 / 29.1, 13.9 / 12.3.
MMA_HB_BITS = (3,) * MMA_W3_HB + (5, 6) * (os.environ.get("ANYBIT_MMA_HB56", "1") != "0")
# Merged W3 at BLOCK_M 8 capped at 128 registers (8 bytes of spills, offline) unless at M = 1 its grid fits
# 3 programs per SM. H100 s26-4 (us, uncapped / capped / two slices): M 4 19.8 / 17.8 / 19.3, 20.4 / 18.8 /
# 20.2, 12.4 / 11.2 / 12.0; M 8 19.9 / 18.3 / 19.8, 20.7 / 18.8 / 20.3, 12.4 / 11.3 / 12.3; M = 1 18.9 / 18.2
# / 17.9, 18.1 / 16.3 / 17.8, but 6144x4096 (384 programs on 396 slots) 7.5 / 9.2 / 10.0. Adding into
# pending sums (s26-5, uncapped / capped) the fitting grid wins at M 4 / 8 too: 6144x4096 7.3 / 9.5, 8.1 /
# 9.9 (the MLP shapes' grids do not fit: 16.1 / 16.0, 17.5 / 17.3 at M 4).
MMA_W3_HB_MAX_REGISTERS = 128
# Programs per SM of the BLOCK_M 8 variants above 128 registers (merged W5 / W6 164-168, W3 164 with KS > 1,
# 2-bit tables with G2 and XP 146; offline sm_90): the grid that still runs in one wave there.
MMA_HEAVY_PER_SM = 3


def grid_fits_heavy(programs: int, sms: int) -> bool:
    """Whether a grid of ``programs`` runs in one wave at ``MMA_HEAVY_PER_SM`` programs per SM."""
    return programs <= MMA_HEAVY_PER_SM * sms


def grid_programs(N: int, ks: int, split: int) -> int:
    """Programs of a launch: N ks / 128 tiles of 128 / ks columns, times the K split."""
    return N * ks // 128 * split
# W6 at M = 1 where the default grid does not fit 3 programs per SM: merged and unrolled on a grid sized for
# 3 per SM (ks and split from ``mma_config`` with 3 programs per SM at BLOCK_M 8), uncapped. H100 s26-13 /
# s26-14 (quant_hb_m1_w6_*, us, this / the GEMV, three runs): 4096x14336 20.3, 20.9, 20.5 / 21.8, 22.5,
# 21.5; 14336x4096 21.0, 21.2, 20.5 / 23.0, 23.0, 22.3; as pending sums 21.4, 20.5 and 20.7, 20.4 (the
# GEMV's pending time not measured alongside, so "auto" takes it for calls writing y only). W3 and W5 were
# slower this way. Only where that grid still splits K (``grid3_choice``): on gate_up's 28672 outputs (ks 1,
# split 1) it ran 47.4 us against the GEMV's 40.1 (s27-2, quant_matmul_m1_pending_s27_2).
MMA_HB_GRID3_BITS = (6,)


def grid3_choice(bits: int, N: int, K: int, G: int, sms: int, g2: bool,
                 programs: int) -> tuple[int, int, int, int] | None:
    """``mma_config`` of a uniform M = 1 call of this width writing y on a grid for ``MMA_HEAVY_PER_SM``
    programs per SM (BLOCK_M 8; merged and unrolled there, ``MMA_HB_GRID3_BITS``), or None where that grid
    does not apply: the default grid's ``programs`` fit ``MMA_HEAVY_PER_SM`` per SM, or the 3-per-SM grid
    would not split K (ks and split 1)."""
    if bits not in MMA_HB_GRID3_BITS or bits not in MMA_HB_BITS or grid_fits_heavy(programs, sms):
        return None
    heavy = {**MMA_PROGRAMS_PER_SM, 8: MMA_HEAVY_PER_SM}
    config = mma_config(1, N, K, G, sms, per_sm=heavy, bits=bits, g2=g2)
    return config if config[2] * config[3] > 1 else None


def grid3_applies(bits: int, N: int, K: int, G: int, sms: int, g2: bool, programs: int) -> bool:
    """Whether ``grid3_choice`` gives a grid for this call."""
    return grid3_choice(bits, N, K, G, sms, g2, programs) is not None


def hb_default(bits: int, bm: int, programs: int, sms: int) -> bool:
    """Whether a uniform call merges its second slice by default (``MMA_HB_BITS``): W3 always (under
    ``bm8_register_cap``), W5 / W6 from BLOCK_M 16, and at BLOCK_M 8 where the grid's ``programs`` fit
    ``MMA_HEAVY_PER_SM`` per SM."""
    if bits not in MMA_HB_BITS:
        return False
    return bits == 3 or bm > 8 or grid_fits_heavy(programs, sms)


def bm8_register_cap(cb3: bool, hb: bool, M: int, programs: int, sms: int, acc: bool = False) -> int | None:
    """The ``maxnreg`` cap of a BLOCK_M 8 call that is not unrolled (None: none): 3-bit codebooks
    ``MMA_CB3_MAX_REGISTERS``; merged W3 (``hb``) ``MMA_W3_HB_MAX_REGISTERS`` unless its ``programs`` fit
    ``MMA_HEAVY_PER_SM`` per SM at M = 1 or adding into a pending sum (``acc``)."""
    if cb3:
        return MMA_CB3_MAX_REGISTERS
    if hb and not ((M == 1 or acc) and grid_fits_heavy(programs, sms)):
        return MMA_W3_HB_MAX_REGISTERS
    return None
MMA_CB_MAX_M = 64  # codebook weights: every BLOCK_M (32 / 64: table values times the scale, rounded once)
MMA_PROGRAMS_PER_SM = {8: 4, 16: 2, 32: 3, 64: 2}  # 32 / 64: 160 / 212 registers (offline, W4, s23)
# Partial tiles in flight in the split-K sum by BLOCK_M. With 8 the kernel compiles to 128 (BLOCK_M 8) /
# 224 (BLOCK_M 16) registers (offline sm_90; the epilogue sets the peak), so 2 programs of BLOCK_M 16
# fit per SM (the split count assumed 3 until s22). Fewer loads (2: 160 registers) or a 128-register cap
# (4 per SM) were *slower* on the H100 (s15-8, quant_matmul_mma_m16_s15_8; W4 M 9-16 on 4096x14336
# 24.3-26.2 / 27.3-32.7 against 22.4-24.9 us, W3 M 16 42.8 against 30.7): with fewer registers ptxas
# schedules the loop's loads less far ahead. Only 6144x4096 (split 8, where "auto" takes the wgmma
# kernel) was faster with 2 (12.8 against 16.9 us at M 9).
MMA_SUM_LOADS = {8: 8, 16: 8, 32: 2, 64: 1}
MMA_KS = (1, 2, 4, 8)  # K splits inside a program (the kernel's KS)
# Groups of 64 (W2 / W4 and nf4's usual size) on 128-K tiles at BLOCK_M 8 / 16: both groups' zero points and
# scales loaded per tile and the tile's MMA chain split in two by K (the kernel's G2), instead of 64-K tiles
# with twice the tiles (at BLOCK_M 16 a program's slice then often has more than 16 tiles, too many for the
# whole x slice in shared memory). H100 s24-9 (quant_codebook_s24_9, us with / without on 4096x14336 /
# 14336x4096 / 6144x4096): M 16 uniform W4 g64 23.3 / 28.0, 23.5 / 28.8, 14.0 / 15.5, nf4 25.7 / 29.3,
# 26.0 / 30.1, 16.9 / 18.6; M 4 uniform 18.8 / 19.8, 18.7 / 19.7, 11.2 / 11.6 but nf4 20.1 / 18.8, 19.8 /
# 18.6, 12.0 / 11.2; M = 1 (155-161 registers at BLOCK_M 8: 3 programs per SM) uniform 22.4 / 18.7, 21.0 /
# 18.6, 8.3 / 10.0.
# On lm_head (128256x4096, s24-16) it turns around: uniform g64 M 4 162.1 / 148.6, M 16 162.9 / 134.5 (its
# 1002 tiles fill the GPU, so 3 programs per SM at BLOCK_M 8 cost), while nf4 gains at every M: M = 1 108.8 /
# 135.2, M 4 114.3 / 148.0, M 16 157.7 / 176.1. So (``g2_applies``): uniform weights at M 2..16 up to
# MMA_G2_WIDE_N outputs, codebooks at M 9..16 and, above that width, at every M. Env ANYBIT_MMA_G2=0: off.
# 2-bit codebooks (learned g64) take it at every M <= 16: H100 s25-8 (quant_codebook_2bit_g64_s25_8, us with
# / without on 14336x4096 / 4096x14336 / 6144x4096): M = 1 17.9 / 18.4, 20.5 / 20.3, 7.3 / 10.6; M 4 14.3 /
# 14.8, 14.4 / 14.7, 9.1 / 9.5; M 16 22.8 / 27.0, 22.8 / 26.3, 15.6 / 17.7.
MMA_G2 = os.environ.get("ANYBIT_MMA_G2", "1") != "0"
MMA_G2_WIDE_N = 16384
# Shared-memory slots of the x ring (the kernel's XS; 0: x loaded from global memory in the loop), by
# BLOCK_M, for single-slice widths (several slices: 0); env ANYBIT_MMA_XS sets both. H100 s16-2/3, W4 (us,
# XS 0 -> 3): M 16 25.4-25.8 -> 22.9-23.8 (4096x14336), 26.7-26.8 -> 23.4-24.0 (14336x4096), 151-153 ->
# 122-124 (lm_head); M 12 23.9 -> 21.7, 27.2 -> 23.6; W2 M 16 level to -10%; W3 (2+1) M 16 level or slower
# (14336x4096 32.1 -> 33.6). At BLOCK_M 8 the ring costs registers (W4 KS 8: 128 -> 140, 3 programs per
# SM) and was slower at M 1 (17.1 -> 21.7 us on 4096x14336) and level at M 4-8. 4 slots: level with 3.
MMA_X_SLOTS = {8: 0, 16: 3, 32: 3, 64: 3}
if os.environ.get("ANYBIT_MMA_XS"):
    MMA_X_SLOTS = dict.fromkeys(MMA_X_SLOTS, int(os.environ["ANYBIT_MMA_XS"]))
# The program's whole x slice in shared memory before the loop (the kernel's XW: tiles the buffer holds,
# compiled for these sizes) where its n_iters tiles fit: no copy and no barrier per tile. Taken before
# the ring, for widths from MMA_X_WHOLE_MIN_BITS; env ANYBIT_MMA_XW=0 turns it off. H100 s16-4 (us, x
# in the loop -> whole slice): W4 M 1 16.7 -> 15.9, 14.9 -> 14.7, 8.8 -> 8.0; M 8 20.0 -> 18.6; M 16 25.8
# -> 23.4, 26.7 -> 22.5, 20.3 -> 18.0; W3 M 16 31.1 -> 25.0, 38.0 -> 27.1. W2 was level (M 1 12.1 ->
# 12.2, M 16 21.9 -> 21.7) and 6144x4096 M 1 took 6.6 us against 6.2 in s15-9: W1/W2 keep x as before.
MMA_X_WHOLE = os.environ.get("ANYBIT_MMA_XW", "1") != "0"
MMA_X_WHOLE_MIN_BITS = 3
MMA_X_WHOLE_TILES = (8, 16)
# The K loop unrolled by two, one word buffer per half refilled right after its tile's unpacking (the
# kernel's U2; single slice, no x ring), by BLOCK_M. The three-buffer loop rotates its words by moves
# that wait for the loads (s16-8 ncu). H100 s16-13, W4 (us, loop -> unrolled): M 16 23.5 -> 21.1, 22.5 ->
# 21.0, 18.0 -> 16.4 (228 registers, still 2 programs per SM). At BLOCK_M 8 it takes 168 registers (3
# per SM): M 1 16.3 -> 20.2 on 4096x14336; capped at 128, 16.9 (M 1) and -2..3% at M 4-8: not taken.
# Env ANYBIT_MMA_U2=0 turns it off.
MMA_UNROLL2 = {8: os.environ.get("ANYBIT_MMA_U2_BM8", "0") == "1",
               16: os.environ.get("ANYBIT_MMA_U2", "1") != "0", 32: False, 64: False}
# W8 at BLOCK_M 8 takes it (127 registers at 64-K tiles, 4 programs per SM; offline sm_90). H100 s23-6
# (quant_matmul_w8_bk64_u*_s23_6, us, M = 1 writing y without / with): 27.6 / 28.5 on 4096x14336 (split 2),
# 27.1 / 25.8 on 14336x4096, 14.9 / 13.3 on 6144x4096; M 4 as pending sums 26.1 / 25.1, 26.5 / 25.8, 14.2 /
# 12.5. With 128-K tiles (168 registers) 30.9-34.1 at M = 1.
MMA_W8_UNROLL2 = os.environ.get("ANYBIT_MMA_W8_U2", "1") != "0"
# Codebook weights (CB) unrolled: at BLOCK_M 16 (247 registers, still 2 programs per SM) and at BLOCK_M 8
# with 64-K tiles (groups of 64, nf4's usual size). H100 s24-1 (quant_codebook_s24_1, us unrolled / not):
# BLOCK_M 16 fp4 g128 25.3 / 27.8, 26.3 / 27.7, 16.9 / 16.9 on 4096x14336 / 14336x4096 / 6144x4096;
# BLOCK_M 8, M = 1: nf4 g64 26.6 / 26.5, 22.8 / 23.4, 12.6 / 13.1, but fp4 g128 18.8 / 17.9, 16.9 / 16.8,
# 10.0 / 9.6.
# 2-bit codebooks (111 registers unrolled at BLOCK_M 8, KS 8) take it at BLOCK_M 8 with any K tile: H100 s25-6
# (quant_codebook_2bit_s25_6, learned g128, us unrolled / not): M = 1 14.2 / 18.7, 12.2 / 16.7, 7.6 / 9.6 on
# 4096x14336 / 14336x4096 / 6144x4096; M 4 13.7 / 14.0, 13.6 / 13.8, 8.9 / 9.0.
# Env ANYBIT_MMA_CB_U2=0: off.
MMA_CB_UNROLL2 = os.environ.get("ANYBIT_MMA_CB_U2", "1") != "0"
# Codebook weights in the unrolled loop: x loaded with the words, two tiles ahead (the kernel's XP; the table
# rules out x's shared-memory ring and whole slice), at BLOCK_M 16 and where M = 1 splits K inside the
# program.
# H100 s24-4 (quant_codebook_s24_4, us with / without): nf4 g64 M = 1 18.0 / 26.4, 17.1 / 23.3, 10.2 / 12.7
# on 4096x14336 / 14336x4096 / 6144x4096 (uniform g64: 18.4 / 18.5 / 10.0); M 16 fp4 25.0 / 26.0, 25.0 /
# 26.2, 16.7 / 17.2 (255 registers, no spills); but M 4 nf4 19.2 / 18.8, and fp4 g128 at M = 1 (not
# unrolled: 17.7) 19.0 and 25.3 on 14336x4096. Env ANYBIT_MMA_CB_XP=0: off.
MMA_CB_XP = os.environ.get("ANYBIT_MMA_CB_XP", "1") != "0"
# 2-bit codebooks with two groups per tile (G2) at BLOCK_M 8 take 146 registers with XP (96 without; offline
# sm_90), so 3 programs per SM: XP only where the grid fits in that. H100 s26-3 (quant_codebook_m1_s26_3,
# learned g64, M = 1, us with / without XP): 21.1 / 17.1 on 4096x14336 (512 programs), 17.8 / 15.1 on
# 14336x4096 (448), 7.3 / 9.2 on 6144x4096 (384, on 132 x 3 slots). Groups of 128 (111 registers) keep it:
# 14.6 / 18.9, 12.2 / 16.6, 7.7 / 9.8.
# Zero points (ZW 1), and scales too (ZW 2), loaded as int32 words of two f16 (the kernel's ZW). H100
# s16-9: W4 level at M 1-16, W3 level; W2 10% faster at M 16 (21.8 -> 19.7, 22.8 -> 20.5 us) but 30%
# slower at M 1. Default: 2 for W2 at BLOCK_M 16, else 0; env ANYBIT_MMA_ZW sets it for every call.
MMA_ZERO_WORDS = int(os.environ["ANYBIT_MMA_ZW"]) if os.environ.get("ANYBIT_MMA_ZW") else None
MMA_X_WHOLE_MAX_K = 16 * 128  # K per program (tiles x BLOCK_K x KS / KS): at most 64 KB at BLOCK_M 16


def x_whole_tiles(n_iters: int, block_k: int, ks: int) -> int:
    """The kernel's XW for a program of ``n_iters`` tiles of ``ks`` chunks of ``block_k`` K: the smallest
    compiled size that holds them (``MMA_X_WHOLE_TILES``), 0 where none does or the slice is longer
    than ``MMA_X_WHOLE_MAX_K`` per chunk."""
    if n_iters * block_k > MMA_X_WHOLE_MAX_K:
        return 0
    return next((t for t in MMA_X_WHOLE_TILES if n_iters <= t), 0)


def ks_fits(ks: int, M: int, bm: int, K: int, G: int, bk: int) -> bool:
    """Whether KS = ks applies: a power of two up to 8, ks x (M rounded up to a power of two) <= bm
    MMA columns, whole iterations of ks x bk of K, and groups that divide or are multiples of it."""
    sk = ks * bk
    return ks in MMA_KS and ks * mma_rows(M) <= bm and K % sk == 0 and (G % sk == 0 or sk % G == 0)


def cb_x_prefetch(bits: int, bm: int, ks: int, g2: bool, programs: int, sms: int) -> bool:
    """Whether an unrolled codebook call loads x with its words two tiles ahead by default (the kernel's XP,
    ``MMA_CB_XP``): at BLOCK_M 16 or with ``ks`` > 1, but for 2-bit tables with two groups per tile (``g2``)
    at BLOCK_M 8 only where the grid's ``programs`` fit ``MMA_HEAVY_PER_SM`` per SM."""
    if not MMA_CB_XP or not (bm == 16 or ks > 1):
        return False
    return not (g2 and bits == 2 and bm == 8) or grid_fits_heavy(programs, sms)


def mma_rows(M: int) -> int:
    """The kernel's MR: x rows per K chunk, M rounded up to a power of two."""
    return 1 << (M - 1).bit_length()


def g2_applies(packed: PackedWeight, M: int | None = None) -> bool:
    """Whether ``packed`` can take 128-K tiles holding two groups of 64 (kernel ``G2``): a single 2- or 4-bit
    slice (uniform or codebook) with groups of 64, and ``MMA_G2`` on; with ``M``, also whether a call of M
    rows takes it by default (``MMA_G2``'s measurements): uniform weights at M 2..16 up to
    ``MMA_G2_WIDE_N`` outputs; 4-bit codebooks at M 9..16, and at every M <= 16 above that width; 2-bit
    codebooks at every M <= 16."""
    fits = MMA_G2 and packed.group_size == 64 and packed.bits in (2, 4)
    if M is None or not fits:
        return fits
    wide = packed.out_features > MMA_G2_WIDE_N
    if packed.fmt == "uniform":
        return 2 <= M <= 16 and not wide
    return M <= 16 and (M >= 9 or wide or packed.bits == 2)


# Pending sums (``acc``) of W3 / W5 at BLOCK_M 8 whose split leaves at least 16 K tiles per program take
# twice the split (past one wave: no split-K ending to pay per program). H100 s27-7
# (quant_matmul_mmaacc_s27_7, us at M 2 / 4 / 8 on gate_up 28672x4096, split 2 / 4): W3 32.1 / 29.8, 32.0 /
# 29.2, 31.7 / 29.1; W5 37.6 / 35.6, 36.6 / 35.2, 38.4 / 36.6; W6 42.4 / 40.0, 40.5 / 40.2, 41.7 / 41.7.
# W2 and W4 are level or slower at 4 (27.2 / 28.6 W4 M 2), and 8 splits lose for every width. Decode (s27-8,
# e2e_w356_accsplit*_s27_8, tok/s with / without, batch 4 and 8): W3 1682 / 1623, 3131 / 3045; W5 1445 / 1429,
# 2709 / 2705; W6 1334 / 1338, 2512 / 2537, so W6 keeps one wave.
# At BLOCK_M 16 (2 programs per SM) gate_up's one-wave grid is one split, 32 K tiles per program; W2 / W3 / W4
# take 4 splits there and W5 2. H100 s27-9 (quant_matmul_mmaacc16_s27_9, us at M 12 / 16, one split / the
# rule's): W2 36.0 / 28.3, 36.4 / 29.8; W3 40.5 / 32.4, 41.0 / 32.5; W4 40.3 / 32.9, 40.1 / 36.6; W5 43.0 /
# 41.0, 43.8 / 42.2; W6 level (45.7 / 45.8). Programs of 14 K tiles (down at split 8) keep their split.
# At BLOCK_M 32 (M 17..32; the MLP shapes take it since s27-13: ``MMA_WIDE_PENDING_BITS`` in
# quant_matmul.py) W2 / W4 / W6 take 4 splits on gate_up (1 split, 64 K tiles of 64 per program) and 16 on
# down (8 splits, 28 K tiles); qkv / o_proj (8 K tiles) keep theirs. H100 s27-12 / s27-13
# (quant_matmul_mmaacc32_s27_12, quant_matmul_mmaacc_rws_s27_13, us at M 24 / 32, the default / the rule's):
# gate_up W2 59.4 / 39.6, 58.7 / 39.4; W4 61.1 / 44.2, 60.1 / 44.5; W6 79.1 / 61.2, 81.1 / 62.6; down W2
# 27.6 / 22.2, 28.1 / 22.7; W4 29.3 / 24.9, 29.9 / 25.4; W6 39.4 / 33.8, 39.7 / 34.4. W5 is best at the
# default on both (53.5, 26.5 at M 24); W3 level.
# W8 at BLOCK_M 8 likewise: gate_up M 4 / 8 53.0 / 53.2 -> 49.1 / 50.4 us (s27-17,
# quant_matmul_mmaacc_w8_s27_17); decode batch 4 / 8 1160 / 2200 against 1119 / 2090 tok/s (s27-18).
# Env ANYBIT_MMA_ACC_SPLIT=0: off.
# BLOCK_M -> width -> ((K tiles per program from which, split factor), ...), the first that applies
_ACC_GATE_UP, _ACC_DOWN = (32, 4), (12, 2)
MMA_ACC_SPLIT = {8: {3: ((16, 2),), 5: ((16, 2),), 8: ((16, 2),)},
                 16: {2: ((32, 4),), 3: ((32, 4),), 4: ((32, 4),), 5: ((32, 2),)},
                 32: {b: (_ACC_GATE_UP, _ACC_DOWN) for b in (2, 4, 6)}}
if os.environ.get("ANYBIT_MMA_ACC_SPLIT", "1") == "0":
    MMA_ACC_SPLIT = {}


def acc_split(bits: int, bm: int, k_tiles: int, split: int) -> int:
    """The split-K of a pending-sum call given ``mma_config``'s ``split`` (``MMA_ACC_SPLIT``: times the
    factor of the first rule of this BLOCK_M and width whose K tiles per program the call reaches)."""
    for long_tiles, factor in MMA_ACC_SPLIT.get(bm, {}).get(bits, ()):
        if k_tiles // split >= long_tiles:
            return split * factor
    return split


def mma_config(M: int, N: int, K: int, G: int, sms: int, ks: int | None = None,
               per_sm: dict | None = None, bits: int = 4, g2: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, split, ks): BLOCK_M 8 or 16; BLOCK_K 128 (64 when the group is 64, unless ``g2``:
    two groups per tile, ``g2_applies``; and for ``bits`` 8: ``MMA_W8_BLOCK_K``); the
    in-program K split ks (None: at M = 1, doubled while the programs, N ks / 128, all stay resident at
    once and each keeps >= 2 iterations); then split-K across programs doubled the same way.
    ``per_sm``: resident programs per SM by BLOCK_M (default ``MMA_PROGRAMS_PER_SM``)."""
    bm = 8 if M <= 8 else 16 if M <= 16 else 32 if M <= 32 else 64
    bk = 128 if G % 128 == 0 or (g2 and G == 64 and bm <= 16) else 64
    if bits == 8 or bm > 16:
        bk = min(bk, MMA_W8_BLOCK_K if bits == 8 else 64)
    if bm > 16 and 1 in SLICES[bits]:  # a 1-bit word holds 32 K: tiles of 128
        bk = 128
    slots = (per_sm or MMA_PROGRAMS_PER_SM)[bm] * sms
    if ks is None:  # M = 1 only: at M 2..4 it measured level or slower on the H100 (s11-1)
        ks = 1
        while M == 1 and ks_fits(ks * 2, M, bm, K, G, bk) and N * ks * 2 // 128 <= slots \
                and K // (ks * 2 * bk) >= 2:
            ks *= 2
    tiles, k_tiles = N * ks // 128, K // (ks * bk)
    split = 1
    while tiles * split * 2 <= slots and k_tiles % (split * 2) == 0 and k_tiles // (split * 2) >= 2:
        split *= 2
    return bm, bk, split, ks


MMA_CLUSTER = os.environ.get("ANYBIT_MMA_CLUSTER", "0") == "1"  # split-K as a cluster: opt-in (slower, s7-1)


def cluster_applies(split: int, device: torch.device, cluster: bool | None = None) -> bool:
    """Whether the K splits run as one thread-block cluster per tile (sm_90+, split a power of two
    from 2 to 16; 16 is a non-portable cluster size that Hopper allows). ``cluster`` None:
    ``MMA_CLUSTER`` (env ``ANYBIT_MMA_CLUSTER=1``; off by default: on the H100 (call s7-1) split 16
    as clusters took 32 us against 17 us through the workspace, split 8 12.3 against 10.5 us,
    split 4 16.1 against 16.4 us)."""
    if not (MMA_CLUSTER if cluster is None else cluster):
        return False
    return split in (2, 4, 8, 16) and torch.cuda.get_device_capability(device)[0] >= 9


def not_applicable(kernel: str, gpu: str, widths, x: torch.Tensor, packed: PackedWeight) -> ValueError:
    """The error for a call outside a kernel's conditions (``mma_applies`` and its variants), naming
    what is needed and what came."""
    M, K = x.shape
    return ValueError(f"{kernel}: needs {gpu}, bf16 x, M <= {MMA_MAX_M} and a uniform "
                      f"{'/'.join(map(str, widths))}-bit weight with integer f16 zero points, N % 128 == 0, "
                      f"K and group % 64 == 0 (got {x.dtype} x, M {M}, {packed.fmt} {packed.bits}-bit, "
                      f"N {packed.out_features}, K {K}, G {packed.group_size})")


def check_acc(acc: torch.Tensor, M: int, N: int) -> None:
    """A pending-sum accumulator must be float32 ``[M, N]`` with contiguous rows."""
    if acc.dtype != torch.float32 or acc.shape != (M, N) or acc.stride(1) != 1:
        raise ValueError(f"acc must be a float32 [{M}, {N}] matrix with contiguous rows, got "
                         f"{acc.dtype} {tuple(acc.shape)}")


def split_k_buffers(split: int, M: int, N: int, tiles: int, y: torch.Tensor, deferred: bool = False):
    """``(ws, locks)`` of a split-K launch: float32 partials ``[split, M, N]`` and the tiles' zeroed
    counters (``_lock_buffer``; none when ``deferred``: split_k_sum adds the partials), or ``(y, y)``
    placeholders without split-K."""
    if split == 1:
        return y, y
    ws = torch.empty(split, M, N, dtype=torch.float32, device=y.device)
    return ws, ws if deferred else _lock_buffer(y.device, tiles)


def quant_gemv_mma(x: torch.Tensor, packed: PackedWeight, y: torch.Tensor, *, block_k: int | None = None,
                   split_k: int | None = None, pdl: bool | None = None, cluster: bool | None = None,
                   diag: int = 0, acc: torch.Tensor | None = None, ks: int | None = None,
                   max_registers: int | None = None, sum_loads: int | None = None,
                   x_slots: int | None = None, x_whole: bool | None = None,
                   zero_words: int | None = None, unroll2: bool | None = None,
                   x_prefetch: bool | None = None, two_groups: bool | None = None,
                   high_bits: bool | None = None, defer: bool | None = None,
                   timeline: torch.Tensor | None = None) -> torch.Tensor:
    """y ``[M, N]`` = x ``[M, K]`` (bf16, perm applied) @ dequant(W)^T for M <= 64: exact integer
    weights ``q - z`` on the tensor cores, float32 scaling per group. Keywords override
    ``mma_config`` (benchmarks; ``ks``: the K split inside a program, ``ks_fits``); ``pdl``:
    programmatic dependent launch (None: where anybit/kernels/pdl.py enables it); ``cluster``:
    split-K as a thread-block cluster summed in distributed shared memory rather than through a
    global workspace (None: ``cluster_applies``'s default); ``diag``: the kernel's DIAG (benchmarks
    only). ``acc`` (float32 ``[M, N]``, rows contiguous, zeroed; y may then be None): the programs
    add their partials into it with float atomics instead of the ordered split-K sum into y
    (anybit/layers/pending.py); returns acc. ``max_registers``: a Triton ``maxnreg`` cap
    (0: none; None: ``bm8_register_cap`` at BLOCK_M 8 not unrolled, else none; caps were slower, s15-8, see
    ``MMA_SUM_LOADS``; the split count assumes the resident programs a cap allows);
    ``sum_loads``: partial tiles in flight in the split-K sum (None:
    ``MMA_SUM_LOADS``); ``x_slots``: the x ring's slots (the kernel's XS: 0 or 2..4; None:
    ``MMA_X_SLOTS`` by BLOCK_M for one slice, 0 for several; always 0 with a cluster); ``x_whole``:
    the program's whole x slice in shared memory up front (the kernel's XW, ``x_whole_tiles``; None:
    ``MMA_X_WHOLE`` where it fits and the width is at least ``MMA_X_WHOLE_MIN_BITS``, taking precedence
    over the ring; True where it does not fit is an error); ``zero_words``: the kernel's ZW (0: zero
    points and scales as f16, 1: zero points as int32 words of two, 2: scales too; None:
    ``MMA_ZERO_WORDS``, by default 2 for W2 at BLOCK_M 16; 0 where zeros or scales are not 4-byte
    aligned); ``unroll2``: the K loop unrolled by two with one word buffer per half (kernel ``U2``:
    single slice, no x ring, no DIAG; None: ``MMA_UNROLL2`` by BLOCK_M where it applies; True where it
    does not apply is an error); ``x_prefetch``: with the unrolled loop and x from global memory, each tile's
    x loaded with its words two tiles ahead (kernel ``XP``; None: ``cb_x_prefetch``).
    Codebook weights (nf4 / fp4 / learned 4-bit, learned 2- and 3-bit): the table kernel (``CB``), no x ring
    or whole slice.
    ``two_groups``: groups of 64 on 128-K tiles (kernel ``G2``; None: ``g2_applies(packed, M)``).
    ``high_bits``: uniform W3 / W5 / W6 as their lowest slice's words joined with their codes' high bits, one
    conversion and one MMA chain (kernel ``HB``, ``MMA_HB_SLICES``; None: ``hb_default``); False: the second
    slice as a chain of its own. ``defer`` (split-K writing y, no cluster): the programs store their partials
    and ``split_k_sum`` adds them in a second kernel (None: split_k_sum.defer_default) instead of each
    tile's last program. ``timeline`` (benchmarks only; the y-writing launch, no cluster): an int64 tensor
    of 8 per program (grid order) that receives the kernel's TS stamps."""
    M, K = x.shape
    N, G, bits = packed.out_features, packed.group_size, packed.bits
    if not mma_applies(packed, M, x):
        raise not_applicable("quant_gemv_mma", "CUDA sm_80+", MMA_BITS, x, packed)
    sms = _num_sms(x.device)
    cb = packed.fmt != "uniform"  # 2- or 4-bit codebook (mma_applies): the table in shared memory at offset
    # 0, so no x ring, no whole x slice and no cluster; z_ptr carries the codebook
    zeros = packed.codebook if cb else packed.zeros
    cap = max_registers or None
    per_sm = {b: max(1, 65536 // (128 * cap)) for b in MMA_PROGRAMS_PER_SM} if cap else None
    g2_ok = g2_applies(packed, None if two_groups else M) and two_groups is not False
    bm, bk, split, ks_auto = mma_config(M, N, K, G, sms, per_sm=per_sm, bits=bits, g2=g2_ok)
    w0, wb, wc = (*SLICES[bits], 0, 0)[:3]
    # a 3-bit codebook's 1-bit slice enters the table lookup with the 2-bit words (the kernel's CB 2), not
    # as a slice of its own
    cbk, wb = (2 if wb else 1, 0) if cb else (0, wb)
    hb_auto = hb_default(bits, bm, grid_programs(N, ks_auto, split), sms)
    defaults = high_bits is None and unroll2 is None and ks is None and split_k is None and cap is None
    grid3 = (grid3_choice(bits, N, K, G, sms, g2_ok, grid_programs(N, ks_auto, split))
             if defaults and not cb and M == 1 and not hb_auto else None)
    if grid3 is not None:  # merged and unrolled on a grid sized for the 3 programs per SM its registers allow
        per_sm = {**MMA_PROGRAMS_PER_SM, 8: MMA_HEAVY_PER_SM}
        bm, bk, split, ks_auto = grid3
        hb_auto, unroll2 = True, True
    hb = not cb and bits in MMA_HB_SLICES and (hb_auto if high_bits is None else high_bits)
    if high_bits and not hb:
        raise ValueError(f"quant_gemv_mma: high_bits needs a uniform weight of {sorted(MMA_HB_SLICES)} bits, "
                         f"got {packed.fmt} {bits}-bit")
    hbw = SLICES[bits][1] if hb else 0  # the kernel's HB: the merged slice's width
    if hb:  # the second slice joins the first's conversion (the kernel's HB), not a chain of its own
        wb = 0
    xs = (0 if (wb and bm <= 16) or cb else MMA_X_SLOTS[bm]) if x_slots is None else x_slots
    if xs not in (0, 2, 3, 4) or (cb and xs):
        raise ValueError(f"quant_gemv_mma: x_slots must be 0, 2, 3 or 4 (0 for a codebook weight), got {xs}")
    regs = dict(SUM_LOADS=sum_loads or MMA_SUM_LOADS[bm], **({"maxnreg": cap} if cap else {}))
    BK = block_k or bk
    g2 = BK == 2 * G and bm <= 16 and g2_applies(packed)  # two groups of 64 per tile
    if BK not in (64, 128, 256) or (G % BK and not g2) or (BK == 64 and 1 in SLICES[bits]):
        raise ValueError(f"quant_gemv_mma: block_k {BK} must be 64, 128 or 256 (not 64 with a 1-bit slice) "
                         f"and divide the group size {G} (or be twice a group of 64 for 2- / 4-bit weights "
                         f"at M <= 16)")
    want_cluster = (MMA_CLUSTER if cluster is None else cluster) and not (cb or g2)  # the cluster sum: KS 1
    if ks is None:
        ks = 1 if want_cluster or bk != BK else ks_auto
    elif ks != 1 and (want_cluster or not ks_fits(ks, M, bm, K, G, BK)):
        raise ValueError(f"quant_gemv_mma: ks {ks} must be 1, 2, 4 or 8 with ks x {mma_rows(M)} (M {M} "
                         f"rounded up) <= {bm}, K {K} a multiple of ks x block_k {BK} and the group size {G} "
                         f"a divisor or multiple of it, and no cluster")
    if ks != ks_auto:
        split = mma_config(M, N, K, G, sms, ks, per_sm, bits, g2)[2]
    SK = ks * BK
    if acc is not None and split_k is None:
        split = acc_split(bits, bm, K // SK, split)
    per, split = k_split(K // SK, split_k or split)
    xw = x_whole_tiles(per, BK, ks)
    if x_whole and (not xw or cb):
        raise ValueError(f"quant_gemv_mma: x_whole needs a uniform weight, at most {MMA_X_WHOLE_TILES[-1]} "
                         f"tiles and {MMA_X_WHOLE_MAX_K} K per program (got {packed.fmt}, {per} tiles of "
                         f"{BK})")
    want_xw = MMA_X_WHOLE and bits >= MMA_X_WHOLE_MIN_BITS if x_whole is None else x_whole
    xw = xw if want_xw and bm <= 16 and not cb else 0
    if xw:
        xs = 0
    zw = zero_words if zero_words is not None else MMA_ZERO_WORDS
    if zw is None:
        zw = 2 if bits == 2 and bm == 16 else 0
    aligned = not cb and packed.zeros.data_ptr() % 4 == 0 and packed.scales.data_ptr() % 4 == 0
    zw = int(zw) if aligned and bm <= 16 and not g2 else 0
    if unroll2 and (wb or xs or diag or bm > 16):
        raise ValueError("quant_gemv_mma: unroll2 needs a single-slice width, no x ring, no diag and M <= 16")
    u2_bm8 = MMA_W8_UNROLL2 if bits == 8 else cb and MMA_CB_UNROLL2 and (BK == 64 or bits == 2)
    u2_default = (MMA_UNROLL2[bm] and (not cb or MMA_CB_UNROLL2)) or (bm == 8 and u2_bm8)
    u2 = bool(u2_default and not (wb or xs or diag) if unroll2 is None else unroll2)
    programs = grid_programs(N, ks, split)
    if max_registers is None and bm == 8 and not u2:  # the 4 programs per SM mma_config assumes
        cap8 = bm8_register_cap(cbk == 2, hb and bits == 3, M, programs, sms, acc is not None)
        if cap8:
            regs["maxnreg"] = cap8
    xp_default = cb and cb_x_prefetch(bits, bm, ks, g2, programs, sms)
    xp = bool(xp_default if x_prefetch is None else x_prefetch) and u2 and not (xw or xs)
    tiles = N * ks // 128
    mr = mma_rows(M) if ks > 1 else 0
    pdl = pdl_enabled(x.device, pdl)
    launch = {"launch_pdl": True} if pdl else {}
    if acc is not None:
        check_acc(acc, M, N)
        kernel = _quant_gemv_mma_kernel[(tiles, split)](
            x, packed.qweight, packed.scales, zeros, acc, acc, acc, M, N, K, G, x.stride(0),
            acc.stride(0), per * SK, per, split, w0, bm, BK, split > 1, pdl, 1, diag, ACC=True, WB=wb, WC=wc,
            KS=ks, MR=mr, XS=xs, XW=xw, ZW=zw, U2=u2, SA=bm > 16, CB=cbk, XP=xp, G2=g2, HB=hbw, num_warps=4,
            **regs, **launch)
        if cb:
            check_table_alone(kernel)
        return acc
    cluster_ok = ks == 1 and bm <= 16 and not (cb or g2 or hb)  # the cluster launch has none of those
    if cluster_ok and cluster_applies(split, x.device, cluster):  # K splits summed in a cluster
        _quant_gemv_mma_kernel[(tiles, 1)](
            x, packed.qweight, packed.scales, packed.zeros, y, y, y, M, N, K, G, x.stride(0), y.stride(0),
            per * BK, per, split, w0, bm, BK, False, pdl, split, diag, WB=wb, WC=wc, num_warps=4,
            num_ctas=split, **regs, **launch)
        return y
    want_defer = split_sum.defer_default("mma", bits, M) if defer is None else bool(defer)
    deferred = split > 1 and not diag and want_defer
    ws, locks = split_k_buffers(split, M, N, tiles, y, deferred)
    if timeline is not None and (timeline.dtype != torch.int64 or timeline.numel() < 8 * tiles * split):
        raise ValueError(f"quant_gemv_mma: timeline must be int64 with >= {8 * tiles * split} elements "
                         f"(8 per program), got {timeline.dtype} {timeline.numel()}")
    kernel = _quant_gemv_mma_kernel[(tiles, split)](
        x, packed.qweight, packed.scales, zeros, y, ws, locks, M, N, K, G, x.stride(0), y.stride(0),
        per * SK, per, split, w0, bm, BK, split > 1, pdl, 1, diag, WB=wb, WC=wc, KS=ks, MR=mr, XS=xs, XW=xw,
        ZW=zw, U2=u2, SA=bm > 16, CB=cbk, XP=xp, G2=g2, HB=hbw, defer_sum=int(deferred), ts_ptr=timeline,
        TS=timeline is not None, num_warps=4, **regs, **launch)
    if cb:
        check_table_alone(kernel)
    if deferred:
        split_sum.split_k_sum(ws, y, pdl)
    return y


def check_table_alone(kernel) -> None:
    """A codebook launch's compiled kernel must hold the code table alone in shared memory: the table loads
    read it at offset 0 (``_table_base``), which only holds when nothing else is allocated beside it (the
    compiler may still overlap it with scratch after the loop). Raises otherwise, e.g. should another Triton
    version place it elsewhere."""
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    table = 4 * MMA_CB_ENTRIES * MMA_CB_LANES
    if shared is not None and shared != table:
        raise RuntimeError(f"quant_gemv_mma: the codebook kernel uses {shared} bytes of shared memory, "
                           f"expected the {table}-byte table alone; its loads would read the wrong place "
                           f"(ANYBIT_MMA_CB=0 routes codebooks to the generic kernels)")
