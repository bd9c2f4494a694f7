"""Register-A conversion of every sliced width (1-7 bits) for the wgmma kernels (quant_gemm_rws).

The wgmma register-A layout gives quad lane q the weights at K ``8 r + 2 q`` and ``8 r + 2 q + 1`` of
every group r of 8 K (quant_gemm_ra). quant_gemm_ra's W4 conversion takes them from byte q of the
group's word (two nibbles). A width of b bits is stored as power-of-two slices (anybit.quant.format:
3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1; slice i holds code bits ``[s_i, s_i + w_i)``), and
the two codes of a group sit in each slice at the same relative place:

- a 4-bit word holds one group: byte q (quant_gemm_ra's ``prmt`` with the lane's selector);
- a 2-bit word holds two groups h = 0, 1: bits ``[16 h + 4 q, 16 h + 4 q + 4)``;
- a 1-bit word holds four groups h = 0..3: bits ``[8 h + 2 q, 8 h + 2 q + 2)``.

So for a slice of width w < 4: ``v = word >> 2 w q`` (the lane's shift) puts group h's two codes at bit
``8 w h`` (byte ``w h``); ``A = v << s`` and ``B = v << (s - w)`` put the first code at bit s of that
byte of A and the second at bit s of that byte of B; ``prmt(A, B)`` with the constant selector of byte
``w h`` gives (first code << s) in the low half and (second << s) in the high half, junk above. Each
slice's bits are merged under a mask (``lop3``), then the W4 arithmetic: ``| 0x4300`` makes 128 + code
in bf16 (exact: codes < 128), ``fma`` gives code - C exactly (C = 2^(b-1)), ``fma`` with the column's
(s, s) and ((C - z) s, ...) (quant_gemm_h2.scale_table) gives the weight rounded once.

One PTX block converts G = 4 / (narrowest width) groups of one weight row for one quad lane: the words
that hold them (``G w / 4`` per slice), so a word's shifts are shared by its groups. Instructions per
group (two codes): W4 5 (quant_gemm_ra's), W2 5, W1 4.5, W3 7.75, W5 7.75, W6 8.5, W7 11.25.

W8: a group is two words (codes 0-3, 4-7), and lane q's codes are bytes 2 q, 2 q + 1 of the pair: one
``prmt`` of both words with the lane's selector. 128 + code is not exact in bf16 (8 bits of
significand), so the low 7 bits make 128 + lo in bf16 as above and the top bit picks the constant that
the first ``fma`` adds: -256 (bf16 0xC380) when it is clear, -128 (0xC300) when set, i.e. 0xC380 xor the
code's bit 7 in place (one ``lop3``): code - 128 exactly. 5 instructions per group.
"""

from __future__ import annotations

from anybit.kernels.quant_gemm_h2 import _half2
from anybit.quant.format import SLICES

RS_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def slice_plan(bits: int) -> tuple[tuple[tuple[int, int], ...], int]:
    """((width, code bit offset) per slice, widest first; G = groups of 8 K per PTX block)."""
    plan, shift = [], 0
    for w in SLICES[bits]:
        plan.append((w, shift))
        shift += w
    return tuple(plan), max(1, 4 // min(SLICES[bits]))


def lane_operand(w: int, q: int) -> int:
    """Quad lane q's operand for a slice of width w: the prmt selector (w = 4: byte q of the word and of
    the word >> 4; w = 8: bytes 2 q and 2 q + 1 of the group's two words) or the shift 2 w q."""
    if w == 8:
        return 2 * q * 0x11 + (2 * q + 1) * 0x1100
    return q * 0x11 + (q + 4) * 0x1100 if w == 4 else 2 * w * q


def slices_asm(bits: int) -> str:
    """PTX for one (weight row, quad lane, block of G groups) of a ``bits``-wide weight. Inputs after the
    2 G outputs: the words of each slice (``G w / 4`` each, in K order), one ``lane_operand`` per slice,
    then the column's half2 (s, s) and ((C - z) s, ...) in bf16 bits. Outputs ``$2g``, ``$2g + 1``: the
    bf16 weights of codes 2 q and 2 q + 1 of group g."""
    if bits not in RS_BITS:
        raise ValueError(f"bits: got {bits}, the register-A slice conversion takes {RS_BITS}")
    plan, G = slice_plan(bits)
    nxt = 2 * G
    words = []
    for w, _ in plan:
        words.append([f"${nxt + j}" for j in range(G * w // 4)])
        nxt += G * w // 4
    lanes = [f"${nxt + i}" for i in range(len(plan))]
    s2, c2 = f"${nxt + len(plan)}", f"${nxt + len(plan) + 1}"
    regs, body = [], []
    if bits == 8:  # one group: bytes 2 q, 2 q + 1 of its two words; bit 7 picks -256 or -128 (module doc)
        a, b = words[0]
        return "\n".join([
            "{", ".reg .b32 k0, k1, p, t;", f"mov.b32 k0, {_half2(1.0, True)};",
            f"prmt.b32 p, {a}, {b}, {lanes[0]};",
            f"lop3.b32 k1, p, 0x00800080, {_half2(-256.0, True)}, 0x6A;",  # 0xC380 ^ (p & 0x80)
            "lop3.b32 t, p, 0x007F007F, 0x43004300, 0xEA;",  # 128 + the low 7 bits
            "fma.rn.bf16x2 t, t, k0, k1;",  # code - 128, exact
            f"fma.rn.bf16x2 t, t, {s2}, {c2};", "mov.b32 {$0, $1}, t;", "}"])
    for i, (w, s) in enumerate(plan):
        if w == 4:
            for g, word in enumerate(words[i]):
                regs += [f"u{i}_{g}", f"p{i}_{g}"]
                body += [f"shr.u32 u{i}_{g}, {word}, 4;", f"prmt.b32 p{i}_{g}, {word}, u{i}_{g}, {lanes[i]};"]
            continue
        for j, word in enumerate(words[i]):
            v, a, b = f"v{i}_{j}", f"a{i}_{j}", f"b{i}_{j}"
            regs.append(v)
            body.append(f"shr.u32 {v}, {word}, {lanes[i]};")
            if s:
                regs.append(a)
                body.append(f"shl.b32 {a}, {v}, {s};")
            else:
                a = v
            regs.append(b)
            body.append(f"shl.b32 {b}, {v}, {s - w};" if s > w else f"shr.u32 {b}, {v}, {w - s};")
            for h in range(4 // w):
                g = j * (4 // w) + h
                regs.append(f"p{i}_{g}")
                body.append(f"prmt.b32 p{i}_{g}, {a}, {b}, {lane_operand(4, w * h):#x};")
    C = 1 << (bits - 1)
    for g in range(G):
        t = f"t{g}"
        regs.append(t)
        for i, (w, s) in enumerate(plan):
            mask = (((1 << w) - 1) << s) * 0x10001
            if i == 0:  # (p & mask) | 0x43004300: 128 + the code's first slice in bf16
                body.append(f"lop3.b32 {t}, p0_{g}, {mask:#010x}, 0x43004300, 0xEA;")
            else:  # t | (p & mask)
                body.append(f"lop3.b32 {t}, {t}, p{i}_{g}, {mask:#010x}, 0xF8;")
        body += [f"fma.rn.bf16x2 {t}, {t}, k0, k1;",  # code - C, exact
                 f"fma.rn.bf16x2 {t}, {t}, {s2}, {c2};",  # s (code - C) + (C - z) s, rounded once
                 f"mov.b32 {{${2 * g}, ${2 * g + 1}}}, {t};"]
    head = ["{", f".reg .b32 k0, k1, {', '.join(regs)};",
            f"mov.b32 k0, {_half2(1.0, True)};", f"mov.b32 k1, {_half2(-128.0 - C, True)};"]
    return "\n".join(head + body + ["}"])


try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover
    gluon = None

if gluon is not None:
    @gluon.constexpr_function
    def _quad_layout(rows, cols, num_warps):
        """Layout of ``[rows word rows (K / 8), cols weight rows, 4 quad lanes]`` matching the wgmma
        register-A operand ``[cols, 8 rows]`` on num_warps (4 or 8: one or two warpgroups; probed with
        ``gl.to_linear_layout``): registers run over the weight row + 8, the word rows and (when each
        warpgroup has two m64 blocks) the weight row + 16 num_warps; lanes over the quad lane q
        (bits 0-1) and the weight rows 1, 2, 4; warps over the weight rows 16, 32 (and 64)."""
        regs = [[0, 8, 0]] + [[1 << i, 0, 0] for i in range(rows.bit_length() - 1)]
        if cols > 16 * num_warps:
            regs.append([0, 16 * num_warps, 0])
        lanes = [[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
        warps = [[0, 16, 0], [0, 32, 0]] + ([[0, 64, 0]] if num_warps == 8 else [])
        return gl.DistributedLinearLayout(regs, lanes, warps, [], [rows, cols, 4])

    _ASM = {b: slices_asm(b) for b in RS_BITS}
    # slices_asm's operands: 2 G bf16 outputs, the words, a lane operand per slice, s2 and c2
    _CONSTRAINTS = {b: ",".join(["=h"] * (2 * slice_plan(b)[1]) + ["r"] * (
        sum(slice_plan(b)[1] * w // 4 + 1 for w in SLICES[b]) + 2)) for b in RS_BITS}

    @gluon.constexpr_function
    def _slice_asm(bits):
        return _ASM[bits]

    @gluon.constexpr_function
    def _constraints(bits):
        return _CONSTRAINTS[bits]

    _GROUPS = {b: slice_plan(b)[1] for b in RS_BITS}

    @gluon.constexpr_function
    def _groups(bits):
        return _GROUPS[bits]

    @gluon.constexpr_function
    def _width(bits, i):
        return SLICES[bits][i] if i < len(SLICES[bits]) else 0

    @gluon.jit
    def _rows_of(w, PARTS: gl.constexpr, WB: gl.constexpr):
        """Words ``[PARTS NB, BN]`` -> PARTS tensors ``[NB, BN]`` in layout WB: rows ``PARTS b + j``."""
        NB: gl.constexpr = w.shape[0] // PARTS
        BN: gl.constexpr = w.shape[1]
        if PARTS == 1:
            return (gl.convert_layout(w, WB),)
        elif PARTS == 2:
            a, b = gl.split(gl.permute(gl.reshape(w, [NB, 2, BN]), (0, 2, 1)))
            return gl.convert_layout(a, WB), gl.convert_layout(b, WB)
        else:
            w4 = gl.permute(gl.reshape(w, [NB, 2, 2, BN]), (0, 3, 1, 2))  # [NB, BN, j >> 1, j & 1]
            e, o = gl.split(w4)
            a, c = gl.split(e)
            b, d = gl.split(o)
            return (gl.convert_layout(a, WB), gl.convert_layout(b, WB), gl.convert_layout(c, WB),
                    gl.convert_layout(d, WB))

    @gluon.jit
    def _block_words(w, PARTS: gl.constexpr, WB: gl.constexpr, zero):
        """``_rows_of`` as ``[NB, BN, 4]`` tensors (each word broadcast over the quad lanes)."""
        parts = _rows_of(w, PARTS, WB)
        if PARTS == 1:
            return (gl.expand_dims(parts[0], 2) + zero,)
        elif PARTS == 2:
            return gl.expand_dims(parts[0], 2) + zero, gl.expand_dims(parts[1], 2) + zero
        else:
            return (gl.expand_dims(parts[0], 2) + zero, gl.expand_dims(parts[1], 2) + zero,
                    gl.expand_dims(parts[2], 2) + zero, gl.expand_dims(parts[3], 2) + zero)

    @gluon.jit
    def _lane_operand(q, W: gl.constexpr):
        """``lane_operand`` for a tensor of quad lanes q."""
        if W == 8:
            return 2 * q * 0x11 + (2 * q + 1) * 0x1100
        elif W == 4:
            return q * 0x11 + (q + 4) * 0x1100
        else:
            return q * (2 * W)

    @gluon.jit
    def convert_slices(w0, w1, w2, s2, c2, BITS: gl.constexpr, AL: gl.constexpr):
        """The words of each slice of one K tile (``w_i [K w_i / 32, BN]``; w1 / w2 unused past the
        slice count) and the columns' table rows ``[1, BN]`` -> the bf16 weights ``[BN, K]`` in the
        register-A layout AL (``slices_asm`` per weight row, quad lane and block of G groups)."""
        G: gl.constexpr = _groups(BITS)
        NB: gl.constexpr = w0.shape[0] * 4 // (G * _width(BITS, 0))  # blocks of G groups
        BN: gl.constexpr = w0.shape[1]
        QL: gl.constexpr = _quad_layout(NB, BN, 4)
        WB: gl.constexpr = gl.SliceLayout(2, QL)
        q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, QL)))
        q = gl.expand_dims(gl.expand_dims(q, 0), 0)  # [1, 1, 4]: the quad lane
        zero = gl.zeros([NB, BN, 4], gl.int32, QL)
        W0: gl.constexpr = _width(BITS, 0)
        W1: gl.constexpr = _width(BITS, 1)
        W2: gl.constexpr = _width(BITS, 2)
        ins = _block_words(w0, G * W0 // 4, WB, zero)
        if W1:
            ins = ins + _block_words(w1, G * W1 // 4, WB, zero)
        if W2:
            ins = ins + _block_words(w2, G * W2 // 4, WB, zero)
        ins = ins + (_lane_operand(q, W0) + zero,)
        if W1:
            ins = ins + (_lane_operand(q, W1) + zero,)
        if W2:
            ins = ins + (_lane_operand(q, W2) + zero,)
        s3 = gl.expand_dims(gl.convert_layout(s2, WB), 2) + zero
        c3 = gl.expand_dims(gl.convert_layout(c2, WB), 2) + zero
        outs = gl.inline_asm_elementwise(_slice_asm(BITS), _constraints(BITS),
                                         ins + (s3, c3), dtype=(gl.bfloat16,) * (2 * G), is_pure=True, pack=1)
        if G == 1:
            v = gl.permute(gl.join(outs[0], outs[1]), (1, 0, 2, 3))  # [BN, NB, 4, 2]
        elif G == 2:
            v = gl.join(gl.join(outs[0], outs[1]), gl.join(outs[2], outs[3]))  # [NB, BN, 4, 2, g]
            v = gl.permute(v, (1, 0, 4, 2, 3))
        else:
            lo = gl.join(gl.join(outs[0], outs[1]), gl.join(outs[4], outs[5]))  # g = 0, 2: [.., 2, g >> 1]
            hi = gl.join(gl.join(outs[2], outs[3]), gl.join(outs[6], outs[7]))  # g = 1, 3
            v = gl.permute(gl.join(lo, hi), (1, 0, 4, 5, 2, 3))  # [BN, NB, g >> 1, g & 1, 4, 2]
        return gl.convert_layout(gl.reshape(v, [BN, NB * G * 8]), AL)
