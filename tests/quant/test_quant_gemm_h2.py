"""Packed-half tensor-core path (``path="gemm", h2_dequant=True``): the PTX per pair, checked by a
bit-level emulation here, and the kernel (plain-Triton twin in the interpreter, PTX on CUDA) vs
ref_quant_matmul for every width, group size, several M and x dtypes."""

import struct

import pytest
import torch

from anybit.kernels import quant_gemm_h2 as qg
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.rtn import QuantSpec, rtn_quantize

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _halves(u: int, bf16: bool) -> list[float]:
    hs = [(u >> s) & 0xFFFF for s in (0, 16)]
    if bf16:
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in hs]
    return [struct.unpack("<e", struct.pack("<H", h))[0] for h in hs]


def _pack(vals: list[float], bf16: bool) -> int:
    t = torch.tensor(vals, dtype=torch.float32).to(torch.bfloat16 if bf16 else torch.float16)
    return sum((int(b) & 0xFFFF) << (16 * i) for i, b in enumerate(t.view(torch.int16).tolist()))


def _emulate(asm: str, word: int, s2: int, c2: int, bf16: bool) -> list[float]:
    """Run one pair's PTX on ints (half2 arithmetic in float64, rounded once per op)."""
    regs = {"$2": word, "$3": s2, "$4": c2}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        a = [t.strip() for t in rest.split(",")]
        val = lambda t: regs[t] if t in regs else int(t, 0)  # noqa: E731
        if op == "mov.b32" and a[0].startswith("{"):
            return _halves(regs[a[-1]], bf16)
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "lop3.b32":
            assert a[4] == "0xEA"  # (a & b) | c
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "prmt.b32":
            by = [(val(t) >> 8 * i) & 0xFF for t in a[1:3] for i in range(4)]
            sel = int(a[3], 0)
            regs[a[0]] = sum(by[(sel >> 4 * i) & 0xF] << 8 * i for i in range(4))
        elif op in ("sub.f16x2", "fma.rn.f16x2", "fma.rn.bf16x2"):
            assert (op == "fma.rn.bf16x2") == bf16
            x, y = _halves(val(a[1]), bf16), _halves(val(a[2]), bf16)
            r = [x[i] - y[i] for i in range(2)] if op == "sub.f16x2" else \
                [x[i] * y[i] + _halves(val(a[3]), bf16)[i] for i in range(2)]
            regs[a[0]] = _pack(r, bf16)
        else:
            raise AssertionError(op)
    raise AssertionError("no output")


@pytest.mark.parametrize("bits, bf16", [(2, False), (4, False), (8, False), (2, True), (4, True)])
def test_ptx_gives_rounded_weights_of_pair(bits, bf16):
    """Pair p of a word = codes (p, p + 16/b): ``round(s (q - C) + c)`` from the shifted word."""
    P, H, C = 32 // bits, 16 // bits, 1 << (bits - 1)
    g = torch.Generator().manual_seed(bits * 2 + bf16)
    for trial in range(30):
        q = torch.randint(0, 2 ** bits, (P,), generator=g).tolist()
        if trial == 0:
            q = [2 ** bits - 1] * P  # every field at its maximum
        word = sum(c << (i * bits) for i, c in enumerate(q))
        s = float(torch.rand(1, generator=g)) * 0.05 + 1e-3
        c = (C - float(torch.randint(0, 2 ** bits, (1,), generator=g)) - 0.25) * s
        s2, c2 = _pack([s, s], bf16), _pack([c, c], bf16)
        sr, cr = _halves(s2, bf16)[0], _halves(c2, bf16)[0]
        for p in range(H):
            shift, _ = qg._pair_layout(bits, p, bf16)
            got = _emulate(qg._gemm_h2_asm(bits, p, bf16), word >> shift, s2, c2, bf16)
            want = _halves(_pack([(q[p] - C) * sr + cr, (q[p + H] - C) * sr + cr], bf16), bf16)
            assert got == want, (p, q, got, want)


def test_bf16_is_refused_for_8_bits():
    with pytest.raises(AssertionError):
        qg._gemm_h2_asm(8, 0, True)


def _packed(N, K, bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, "uniform")).to(DEV)


# (M, x dtype, tolerance): bf16 codes (default for bf16 x at 2/4 bits) round the weights to bf16,
# and the interpreter's float32 -> bf16 conversion truncates
_CASES = [(2, torch.bfloat16, 1e-2), (3, torch.float16, 3e-3), (16, torch.float32, 3e-3),
          (33, torch.bfloat16, 1e-2), (64, torch.float16, 3e-3)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_gemm_h2_vs_reference(bits, group):
    K = {32: 160, 64: 192, 128: 384, -1: 160}[group]  # multiples of the group size, not of 256
    pw = _packed(80, K, bits, group, seed=bits * 7 + group)
    for M, dtype, tol in _CASES:
        x = torch.randn(M, K, device=DEV).to(dtype)
        ref = ref_quant_matmul(x.float(), pw)
        y = quant_matmul(x, pw, path="gemm", h2_dequant=True)
        assert y.dtype == dtype and y.shape == (M, 80) and torch.isfinite(y).all()
        err = float((y.float() - ref).norm() / ref.norm())
        assert err < tol, (M, dtype, err)


@pytest.mark.parametrize("bits", [2, 4])
def test_f16_codes_for_bf16_x(bits):
    pw = _packed(96, 256, bits, 128, seed=11)
    x = (torch.randn(5, 256, device=DEV) * 300).to(torch.bfloat16)  # x / 16 -> f16: no overflow
    ref = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw, path="gemm", h2_dequant=True, bf16_codes=False)
    assert float((y.float() - ref).norm() / ref.norm()) < 5e-3


def test_split_k_out_slice_blocks_and_zeroed_counters():
    pw = _packed(144, 512, 4, 64, seed=5)  # 144 columns: two column tiles, the second partial
    x = torch.randn(20, 512, device=DEV, dtype=torch.float16)
    ref = ref_quant_matmul(x.float(), pw)
    for kw in (dict(split_k=3), dict(split_k=8, block_n=64), dict(split_k=1, block_m=32), dict(block_k=64)):
        out = torch.full((20, 200), float("nan"), device=DEV, dtype=torch.float16)
        quant_matmul(x, pw, out=out[:, 30:174], path="gemm", h2_dequant=True, **kw)
        err = float((out[:, 30:174].float() - ref).norm() / ref.norm())
        assert err < 3e-3, (kw, err)
        assert torch.isnan(out[:, :30].float()).all() and torch.isnan(out[:, 174:].float()).all()
    assert all(int(b.abs().sum()) == 0 for b in qg._locks.values())  # the kernel leaves them at zero


def test_scale_table_is_cached_and_follows_in_place_updates():
    pw = _packed(64, 128, 4, 32, seed=3)
    t1 = qg.scale_table(pw, False)
    assert qg.scale_table(pw, False) is t1
    assert qg.scale_table(pw, True) is not t1
    pw.scales.mul_(2)
    t2 = qg.scale_table(pw, False)
    assert not torch.equal(t2, t1)
    s = (t2[0] & 0xFFFF).to(torch.int16).view(torch.float16)
    assert torch.equal(s, pw.scales)


def test_gemm_h2_rejects_other_formats():
    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(3, 32, "uniform")).to(DEV)
    with pytest.raises(ValueError, match="h2_dequant"):
        quant_matmul(torch.randn(4, 64, device=DEV), pw, path="gemm", h2_dequant=True)
    pw = rtn_quantize(torch.randn(32, 64), QuantSpec(4, 32, "nf4")).to(DEV)
    with pytest.raises(ValueError, match="h2_dequant"):
        quant_matmul(torch.randn(4, 64, device=DEV), pw, path="gemm", h2_dequant=True)
