"""Packed-half GEMV for any-bit weights at M = 1 (uniform 2/4/8 bits, fp16/bf16 x).

``_quant_gemv_h2_kernel`` (``quant_matmul(..., path="gemv_h2")``, chosen by the launcher in
quant_matmul.py): packed half-precision arithmetic (Marlin / FasterTransformer "fast
int-to-half"): one LOP3 (PRMT for 8 bits) places two codes into the mantissas of an f16x2
``0x6400 | q`` (= 1024 + q), one ``sub``/``fma.f16x2`` makes it ``q - 2^(b-1)`` exactly, one
``fma.f16x2`` multiplies two codes by two x values; the f16 lane sums of one word go to float32.
x is prepared once per call (``_prep_x_h2_kernel``): f16 pairs scaled by 2^-S, and per-word sums
for the zero term. On CUDA the word's math is one inline-PTX block; elsewhere (interpreter)
plain Triton ops compute the same function in float32. Shared launcher helpers (block-K choice,
SM count) live here too. The torch reference is ``ref_quant_matmul`` in quant_matmul.py.
"""

from __future__ import annotations

import functools
import os
import struct

import torch

from anybit.quant.format import PackedWeight

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


@functools.lru_cache(maxsize=16)
def _sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 4


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
    def _store_row_split_k(out, y_ptr, ws_ptr, lock_ptr, m, pid_n, pid_k, M, N, offs_n, mask_n, stride_ym,
                           SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Store one row's ``[BLOCK_N]`` float32 partial. Without split-K straight to y; with it to
        the ``[SPLIT_K, M, N]`` workspace, and the last split of the tile (counted in lock_ptr)
        adds the partials and writes y."""
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
        _store_row_split_k(tl.sum(acc, axis=0), y_ptr, ws_ptr, lock_ptr, m, pid_n, pid_k, M, N, offs_n,
                           mask_n, stride_ym, SPLIT_K, BLOCK_N)


H2_BITS = (2, 4, 8)  # launcher: widths that take the packed-half GEMV at M <= H2_MAX_M (fp16/bf16 x, CUDA)
H2_MAX_M = 1
H2_WORDS_PER_ASM = 2  # words whose f16 lane sums are added before the float32 conversion
# BLOCK_N by width: measured on the H200 (benchmarks/results/quant_matmul_h2.json), 256 was the
# fastest or within 4% for W4 on all four shapes, 128 for W2 and W8.
H2_BLOCK_N = {2: 128, 4: 256, 8: 128}
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
