"""Packed-half GEMV (``path="gemv_h2"``): the PTX text, checked by a bit-level emulation here,
and the kernel (plain-Triton twin in the interpreter; the PTX on CUDA) vs ref_quant_matmul."""

import struct

import pytest
import torch

from anybit.kernels.quant_gemv_h2 import H2_SHIFT, _h2_asm, _h2s_asm, split_k_counters
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.format import SLICES
from anybit.quant.rtn import QuantSpec, rtn_quantize

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _h(u: int) -> tuple[float, float]:
    return tuple(struct.unpack("<e", struct.pack("<H", (u >> s) & 0xFFFF))[0] for s in (0, 16))


def _f16(v: float) -> float:
    return struct.unpack("<e", struct.pack("<e", v))[0]


def _emulate(asm: str, words: list[int], extra: dict | None = None) -> list[tuple[float, float]]:
    """Run the extraction/conversion part of the PTX on ints; return the f16x2 values that meet x.
    ``extra``: more input registers (the table word of the folded-zero form)."""
    regs = {f"${i + 1}": w for i, w in enumerate(words)} | (extra or {})
    out = []
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        a = [t.strip() for t in rest.split(",")]
        val = lambda t: regs[t] if t in regs else int(t, 0)  # noqa: E731
        if op == "mov.b32" and not a[0].startswith("{"):
            regs[a[0]] = val(a[1])
        elif op == "shr.u32":
            regs[a[0]] = val(a[1]) >> int(a[2])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << int(a[2])) & 0xFFFFFFFF
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "prmt.b32":  # default mode; selector nibbles 0-7 only (no sign replication)
            by = [(val(t) >> 8 * i) & 0xFF for t in a[1:3] for i in range(4)]
            sel = int(a[3], 0)
            assert all((sel >> 4 * i) & 0x8 == 0 for i in range(4))
            regs[a[0]] = sum(by[(sel >> 4 * i) & 0xF] << 8 * i for i in range(4))
        elif op in ("sub.f16x2", "add.rn.f16x2") or (op == "fma.rn.f16x2" and not a[2].startswith("$")):
            x, y = _h(val(a[1])), _h(val(a[2]))
            r = [_f16(x[i] - y[i]) for i in range(2)] if op == "sub.f16x2" else \
                [_f16(x[i] + y[i]) for i in range(2)] if op == "add.rn.f16x2" else \
                [_f16(x[i] * y[i] + _h(val(a[3]))[i]) for i in range(2)]
            regs[a[0]] = sum(struct.unpack("<H", struct.pack("<e", v))[0] << 16 * i for i, v in enumerate(r))
        elif op in ("mul.f16x2", "fma.rn.f16x2"):
            out.append(_h(regs[a[1]]))
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("words", [1, 2])
def test_ptx_gives_scaled_centred_codes_in_pair_order(bits, words):
    P, H, C, S = 32 // bits, 16 // bits, 1 << (bits - 1), 2.0 ** -H2_SHIFT[bits]
    g = torch.Generator().manual_seed(bits * 10 + words)
    for _ in range(50):
        qs = torch.randint(0, 2 ** bits, (words, P), generator=g).tolist()
        got = _emulate(_h2_asm(bits, words), [sum(c << (i * bits) for i, c in enumerate(q)) for q in qs])
        assert got == [((q[j] - C) * S, (q[j + H] - C) * S) for q in qs for j in range(H)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("words", [1, 2])
def test_ptx_folded_zero_gives_exact_codes_minus_zero(bits, words):
    """zfold: the table word's high half (-z 2^-S, f16) turns the codes into (q - z) 2^-S exactly,
    for every integer zero point z of the width."""
    P, H, S = 32 // bits, 16 // bits, 2.0 ** -H2_SHIFT[bits]
    g = torch.Generator().manual_seed(bits * 100 + words)
    asm = _h2_asm(bits, words, zfold=True)
    table_reg = f"${1 + words + words * H}"
    for z in range(2 ** bits):
        zt = struct.unpack("<H", struct.pack("<e", -z * S))[0]
        qs = torch.randint(0, 2 ** bits, (words, P), generator=g).tolist()
        words_in = [sum(c << (i * bits) for i, c in enumerate(q)) for q in qs]
        got = _emulate(asm, words_in, {table_reg: zt << 16})
        assert got == [((q[j] - z) * S, (q[j + H] - z) * S) for q in qs for j in range(H)]



def _two_slice_block(bits: int, q: list[list[int]]) -> list[int]:
    """Codes ``q [R][P0]`` of the R slice-0 words under R / (w0 / w1) slice-1 words -> the PTX
    inputs (the R slice-0 words, then the slice-1 words) in the layout of anybit/quant/format.py."""
    w0, w1 = SLICES[bits]
    P0, ratio = 32 // w0, w0 // w1
    words = [sum((c & ((1 << w0) - 1)) << (i * w0) for i, c in enumerate(row)) for row in q]
    vs = [sum((c >> w0) << ((r * P0 + i) * w1) for r, row in enumerate(q[b:b + ratio])
              for i, c in enumerate(row)) for b in range(0, len(q), ratio)]
    return words + vs


@pytest.mark.parametrize("bits", [3, 5, 6])
@pytest.mark.parametrize("nv", [1, 2])
def test_ptx_two_slice_gives_exact_codes_minus_zero(bits, nv):
    """Two-slice block (zfold, nv slice-1 words): every pair that meets x is ((q_j - z) 2^-S,
    (q_{j+H0} - z) 2^-S) exactly, for every integer zero point z and every code at every position
    (codes cycle through all values position by position), plus random blocks."""
    w0, w1 = SLICES[bits]
    R, P0, H0, S = nv * w0 // w1, 32 // w0, 16 // w0, 2.0 ** -H2_SHIFT[bits]
    asm = _h2s_asm(bits, nv)
    table_reg = f"${1 + R + nv + R * H0}"
    g = torch.Generator().manual_seed(bits)
    for z in range(2 ** bits):
        zt = struct.unpack("<H", struct.pack("<e", -z * S))[0]
        blocks = [[[(r * P0 + i + t) % 2 ** bits for i in range(P0)] for r in range(R)]
                  for t in range(2 ** bits)]
        blocks += [torch.randint(0, 2 ** bits, (R, P0), generator=g).tolist() for _ in range(4)]
        for q in blocks:
            got = _emulate(asm, _two_slice_block(bits, q), {table_reg: zt << 16})
            assert got == [((q[r][j] - z) * S, (q[r][j + H0] - z) * S) for r in range(R) for j in range(H0)]

def _packed(N, K, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, "uniform")).to(DEV)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group, words, fuse_x, stages, zfold", [
    (128, 2, True, 1, None), (32, 2, False, 1, None), (-1, 1, True, 1, None), (128, 2, True, 3, False),
    (32, 1, True, 2, None), (128, 1, True, 1, False)])
def test_gemv_h2_vs_reference(bits, group, words, fuse_x, stages, zfold):
    from anybit.kernels.quant_gemv_h2 import quant_gemv_h2

    K = 384 if group == 128 else 160 if group == 32 else 256
    pw = _packed(96, K, bits, group, seed=bits + group)
    for dtype, M, tol in ((torch.bfloat16, 1, 1e-2), (torch.float16, 2, 5e-3), (torch.float32, 1, 2e-3)):
        x = torch.randn(M, K, device=DEV).to(dtype)
        ref = ref_quant_matmul(x.float(), pw)
        y = quant_gemv_h2(x, pw, torch.empty(M, 96, device=DEV, dtype=dtype), words_per_asm=words,
                          fuse_x=fuse_x, stages=stages, block_n=32 if stages > 1 else None, zfold=zfold)
        assert y.dtype == dtype and torch.isfinite(y).all()
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < tol, (dtype, err)


def test_gemv_h2_split_k_out_slice_and_large_x():
    pw = _packed(80, 512, 4, 64, seed=7)
    x = torch.randn(1, 512, device=DEV, dtype=torch.bfloat16) * 300  # |x| up to ~1e3: no f16 overflow
    ref = ref_quant_matmul(x.float(), pw)
    out = torch.full((1, 160), float("nan"), device=DEV, dtype=torch.bfloat16)
    quant_matmul(x, pw, out=out[:, 40:120], path="gemv_h2", split_k=4)
    err = float((out[:, 40:120].float() - ref).norm() / ref.norm())
    assert err < 1e-2
    assert torch.isnan(out[:, :40].float()).all() and torch.isnan(out[:, 120:].float()).all()
    assert int(split_k_counters(x.device, 1).abs().sum()) == 0  # the last split resets its counter


def test_gemv_h2_x_at_odd_offset_and_repeated_calls():
    """x as an odd-offset view (the int32 reinterpretation needs a copy) and back-to-back calls
    sharing the persistent split-K counters give the same result every time."""
    pw = _packed(64, 256, 4, 128, seed=3)
    buf = torch.randn(1, 257, device=DEV).to(torch.bfloat16)
    x = buf[:, 1:]
    ref = ref_quant_matmul(x.float(), pw)
    outs = [quant_matmul(x, pw, path="gemv_h2", split_k=2) for _ in range(3)]
    for y in outs:
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
        assert torch.equal(y, outs[0])


@pytest.mark.parametrize("bits", [3, 5, 6])
@pytest.mark.parametrize("group, N", [(128, 96), (32, 37), (-1, 129)])
def test_gemv_h2_two_slice_vs_reference(bits, group, N):
    """3/5/6 bits (two slices, folded zero): bf16/fp16/fp32 x, M = 1 and 2, odd N, split-K, one
    or two slice-1 words per PTX block (words_per_asm; one at BLOCK_K 32 for 3/5 bits)."""
    from anybit.kernels.quant_gemv_h2 import quant_gemv_h2

    K = 384 if group == 128 else 160 if group == 32 else 256
    pw = _packed(N, K, bits, group, seed=bits * 7 + group)
    for dtype, M, tol, split, nv in ((torch.bfloat16, 1, 1e-2, None, 1), (torch.float16, 2, 5e-3, 2, 2),
                                     (torch.float32, 1, 2e-3, 3, None)):
        x = torch.randn(M, K, device=DEV).to(dtype)
        ref = ref_quant_matmul(x.float(), pw)
        y = quant_gemv_h2(x, pw, torch.empty(M, N, device=DEV, dtype=dtype), split_k=split,
                          block_n=32 if N < 64 else None, words_per_asm=nv)
        assert y.dtype == dtype and torch.isfinite(y).all()
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < tol, (dtype, err)


def test_gemv_h2_two_slice_large_x_and_extreme_codes():
    """|x| ~ 1e3 and codes at 0 / 2^b - 1 with zero points at the other end (|q - z| = 2^b - 1):
    no f16 overflow, exact codes; the launcher's split-K output slice."""
    from anybit.quant.format import PackedWeight, pack_codes

    for bits in (3, 5, 6):
        N, K, G = 40, 256, 64
        g = torch.Generator().manual_seed(bits)
        hi = 2 ** bits - 1
        q = torch.where(torch.rand(N, K, generator=g) < 0.5, 0, hi)
        z = torch.where(torch.rand(K // G, N, generator=g) < 0.5, 0.0, float(hi))
        s = (torch.rand(K // G, N, generator=g) * 0.02 + 0.001).half()
        pw = PackedWeight(pack_codes(q, bits), s, z.half(), bits, G, K, N).to(DEV)
        x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16) * 1000
        ref = ref_quant_matmul(x.float(), pw)
        out = torch.full((1, 3 * N), float("nan"), device=DEV, dtype=torch.bfloat16)
        quant_matmul(x, pw, out=out[:, N:2 * N], path="gemv_h2", split_k=2)
        assert float((out[:, N:2 * N].float() - ref).norm() / ref.norm()) < 1e-2
        assert torch.isnan(out[:, :N].float()).all() and torch.isnan(out[:, 2 * N:].float()).all()


def test_gemv_h2_routing_by_width_and_zero_points():
    """The launcher's packed-half choice at M = 1 on CUDA: 2/4/8 bits always (zfold or x sums),
    3/5/6 bits only with integer zero points (gemv_table), never on CPU / in the interpreter."""
    from anybit.kernels.quant_gemv_h2 import H2_SLICE_BITS, gemv_h2_applies
    from anybit.quant.format import PackedWeight

    for bits in (2, 3, 4, 5, 6, 7, 8):
        pw = _packed(32, 128, bits, 64, seed=bits)
        frac = PackedWeight(pw.qweight, pw.scales, pw.zeros + 0.5, bits, 64, 128, 32)
        want = bits in (2, 4, 8) or bits in H2_SLICE_BITS
        assert gemv_h2_applies(pw, 1, torch.bfloat16, on_cuda=True) == want
        assert gemv_h2_applies(frac, 1, torch.float16, on_cuda=True) == (bits in (2, 4, 8))
        assert not gemv_h2_applies(pw, 1, torch.bfloat16, on_cuda=False)
        assert not gemv_h2_applies(pw, 2, torch.bfloat16, on_cuda=True)
        assert not gemv_h2_applies(pw, 1, torch.float32, on_cuda=True)
    cb = rtn_quantize(torch.randn(32, 64), QuantSpec(4, 32, "nf4"))
    assert not gemv_h2_applies(cb, 1, torch.bfloat16, on_cuda=True)


def test_gemv_h2_rejects_other_formats():
    from anybit.quant.format import PackedWeight

    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(7, 32, "uniform")).to(DEV)
    with pytest.raises(ValueError, match="gemv_h2"):
        quant_matmul(torch.randn(1, 64, device=DEV), pw, path="gemv_h2")
    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(3, 32, "uniform")).to(DEV)
    frac = PackedWeight(pw.qweight, pw.scales, pw.zeros + 0.25, 3, 32, 64, 32)  # 3 bits: folded zero only
    with pytest.raises(ValueError, match="zfold"):
        quant_matmul(torch.randn(1, 64, device=DEV), frac, path="gemv_h2")
    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(4, 32, "nf4")).to(DEV)
    with pytest.raises(ValueError, match="gemv_h2"):
        quant_matmul(torch.randn(1, 64, device=DEV), pw, path="gemv_h2")


def test_gemv_h2_fractional_zeros_keep_the_x_sum_form():
    """gemv_table is None for zero points that are not integers of the width: the launcher then
    computes the zero term from x sums (still exact vs the reference); asking for zfold is an error."""
    from anybit.kernels.quant_gemv_h2 import gemv_table, quant_gemv_h2
    from anybit.quant.format import PackedWeight

    pw = _packed(64, 256, 4, 128, seed=11)
    assert gemv_table(pw) is not None
    frac = PackedWeight(pw.qweight, pw.scales, pw.zeros + 0.25, 4, 128, 256, 64)
    assert gemv_table(frac) is None
    x = torch.randn(1, 256, device=DEV).to(torch.bfloat16)
    ref = ref_quant_matmul(x.float(), frac)
    y = quant_gemv_h2(x, frac, torch.empty(1, 64, device=DEV, dtype=torch.bfloat16))
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    with pytest.raises(ValueError, match="zfold"):
        quant_gemv_h2(x, frac, torch.empty(1, 64, device=DEV, dtype=torch.bfloat16), zfold=True)


@pytest.mark.parametrize("bits,split_k,K", [(4, 4, 512), (2, 1, 512), (3, 2, 512), (5, 16, 2048),
                                           (6, 8, 2048)])
def test_gemv_h2_adds_its_partials_into_the_accumulator(bits, split_k, K):
    """quant_gemv_h2(acc=...): the float32 sum of the split partials lands in acc (a column slice of
    a wider accumulator, as for a fused layer's part), y untouched; rounded, it is within one bf16
    step of the ordered split-K result. W5 / W6 with the short programs of ``pending_split``."""
    from anybit.kernels.quant_gemv_h2 import quant_gemv_h2
    from anybit.layers.pending import new_pending

    pw = _packed(80, K, bits, 64, seed=bits)
    x = torch.randn(1, K).to(torch.bfloat16).to(DEV)
    wide = new_pending(1, 120, torch.bfloat16, (1, 120), torch.device(DEV))
    out = quant_gemv_h2(x, pw, None, acc=wide.acc[:, 20:100], split_k=split_k)
    assert out.data_ptr() == wide.acc[:, 20:100].data_ptr()
    assert not wide.acc[:, :20].any() and not wide.acc[:, 100:].any()
    ref = ref_quant_matmul(x.float(), pw)
    assert float((wide.acc[:, 20:100] - ref).norm() / ref.norm()) < 1e-2
    y = torch.empty(1, 80, dtype=torch.bfloat16, device=DEV)
    quant_gemv_h2(x, pw, y, split_k=split_k)
    step = y.float().abs() * 2 ** -7 + 1e-6
    assert ((wide.acc[:, 20:100].to(torch.bfloat16).float() - y.float()).abs() <= step).all()
    with pytest.raises(ValueError, match="acc"):
        quant_gemv_h2(x, pw, None, acc=torch.zeros(1, 79, device=DEV))
    wide.materialize()


def test_gemv_h2_block_n_override_by_shape(monkeypatch):
    """ANYBIT_H2_BN=NxK=BN (experiments) sets BLOCK_N for one weight shape; bad values are refused."""
    from anybit.kernels.quant_gemv_h2 import _bn_override, quant_gemv_h2

    pw = _packed(80, 512, 4, 64, seed=11)
    x = torch.randn(1, 512).to(torch.bfloat16).to(DEV)
    monkeypatch.setenv("ANYBIT_H2_BN", "96x512=64,80x512=32")
    assert _bn_override(80, 512) == 32 and _bn_override(96, 512) == 64 and _bn_override(80, 256) is None
    y = quant_gemv_h2(x, pw, torch.empty(1, 80, dtype=torch.bfloat16, device=DEV))
    ref = ref_quant_matmul(x.float(), pw)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    monkeypatch.setenv("ANYBIT_H2_BN", "80x512=48")
    with pytest.raises(ValueError, match="ANYBIT_H2_BN"):
        quant_gemv_h2(x, pw, torch.empty(1, 80, dtype=torch.bfloat16, device=DEV))


@pytest.mark.parametrize("bits,k_tiles,split,want", [(5, 32, 2, 16), (6, 32, 4, 16), (5, 112, 16, 16),
                                                     (3, 32, 2, 2), (4, 32, 2, 8), (5, 24, 2, 12),
                                                     (6, 8, 1, 4), (5, 32, 8, 8), (2, 32, 4, 16),
                                                     (8, 32, 2, 2), (4, 112, 28, 28), (4, 32, 8, 8)])
def test_pending_split_rule(bits, k_tiles, split, want):
    """Pending sums of W2 / W5 / W6 (W4) whose one-wave split leaves >= 8 K tiles per program take 2 (4)
    K tiles per program (at most 16 splits); other widths and shorter programs keep the one-wave split."""
    from anybit.kernels import quant_gemv_h2 as h2
    if bits not in h2.H2_ACC_SHORT_BITS:  # env ANYBIT_H2_ACC_SHORT=0 or a width the rule leaves alone
        assert h2.pending_split(bits, k_tiles, split) == split
        return
    assert h2.pending_split(bits, k_tiles, split) == want


def test_h2_config_narrow_blocks_for_pending_sums(monkeypatch):
    """Pending sums (acc) of W8 on every decode shape and of W4 on N >= 16384 take BLOCK_N 64 (H100 s27-9 /
    s27-12); writing y and lm_head-sized N keep theirs; off, the previous choices come back."""
    from anybit.kernels import quant_gemv_h2 as h2
    monkeypatch.setattr(h2, "H2_ACC_NARROW", True)
    assert h2.h2_config(8, 28672, 4096, True, acc=True) == (64, 4)
    assert h2.h2_config(8, 4096, 4096, True, acc=True) == (64, 4)
    assert h2.h2_config(8, 28672, 4096, True) == (32, 4)  # writing y (s22-2)
    assert h2.h2_config(4, 28672, 4096, True, acc=True) == (64, 4)
    assert h2.h2_config(4, 6144, 4096, True, acc=True) == (256, 4)
    assert h2.h2_config(8, 128256, 4096, True, acc=True) == (256, 8)  # lm_head-sized
    monkeypatch.setattr(h2, "H2_ACC_NARROW", False)
    assert h2.h2_config(8, 28672, 4096, True, acc=True) == (128, 4)
    assert h2.h2_config(4, 28672, 4096, True, acc=True) == (256, 4)
