"""The register-A conversion of every sliced width (anybit/kernels/ra_slices.py), on CPU: its PTX run by
bit-level emulation on packed words of random codes must give, for each quad lane, the bf16 weights of
K 8 r + 2 q and 8 r + 2 q + 1 of every group r (the wgmma register-A layout), rounded once as
quant_gemm_ra's W4 arithmetic."""

import pytest
import torch
from test_quant_gemm_h2 import _halves, _pack  # same folder
from test_quant_gemm_wg import _bf16_bits, _emulate_word

from anybit.kernels import ra_slices as rs
from anybit.kernels.quant_gemm_ra import _ra_asm, _ra_selector
from anybit.quant.format import SLICES, pack_codes


@pytest.mark.parametrize("bits", rs.RS_BITS)
def test_ptx_gives_each_lanes_codes_of_every_group(bits):
    plan, G = rs.slice_plan(bits)
    C = 1 << (bits - 1)
    asm = rs.slices_asm(bits)
    g = torch.Generator().manual_seed(bits)
    for trial in range(12):
        codes = torch.randint(0, 2 ** bits, (1, 64), generator=g)
        if trial == 0:
            codes[:] = 2 ** bits - 1  # every bit set: no carry between slices or halves
        words = [v & 0xFFFFFFFF for v in pack_codes(codes, bits)[:, 0].tolist()]  # one weight row, 64 K
        per_slice, off = [], 0
        for w in SLICES[bits]:
            per_slice.append(words[off:off + 2 * w])
            off += 2 * w
        s = float(torch.rand(1, generator=g)) * 0.05 + 1e-3
        z = int(torch.randint(0, 2 ** bits, (1,), generator=g))
        s2, c2 = _pack([s, s], True), _pack([(C - z) * s, (C - z) * s], True)
        sr, cr = _halves(s2, True)[0], _halves(c2, True)[0]
        for b in range(8 // G):  # blocks of G groups of 8 K
            ins = [v for (w, _), ws in zip(plan, per_slice) for v in ws[b * G * w // 4:(b + 1) * G * w // 4]]
            for q in range(4):
                got = _emulate_word(asm, *ins, *[rs.lane_operand(w, q) for w, _ in plan], s2, c2)
                ks = [8 * (b * G + j) + 2 * q + e for j in range(G) for e in (0, 1)]
                want = [_bf16_bits(float(torch.tensor((int(codes[0, k]) - C) * sr + cr, dtype=torch.float32)))
                        for k in ks]
                assert got == want, (trial, b, q, [hex(v) for v in got], [hex(v) for v in want])


def test_w4_block_is_quant_gemm_ra_arithmetic():
    """At W4 quant_gemm_ra runs this module's block (one PTX for both kernels: the same bits), with the
    prmt selector of byte q of the word and of the word >> 4 (bytes 4..7 are the second source's)."""
    assert _ra_asm(4) == rs.slices_asm(4)
    assert [_ra_selector(q) for q in range(4)] == [q * 0x11 + (q + 4) * 0x1100 for q in range(4)]
    with pytest.raises(ValueError, match="bits"):
        rs.slices_asm(9)
