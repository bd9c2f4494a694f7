"""Gluon wgmma path (``path="wg"``, anybit/kernels/quant_gemm_wg.py). Gluon does not run under the
Triton interpreter, so on CPU: the per-word PTX by bit-level emulation, the launcher's rules, and an
offline sm_90 compile whose SASS must keep one wgmma group in flight while the next tile converts.
On CUDA (Hopper): the kernel against ref_quant_matmul."""

import os
import re
import struct

import pytest
import torch
from sm90_sass import nvdisasm, sm90_sass  # same folder (pytest puts it on sys.path)
from test_quant_gemm_h2 import _halves, _pack

from anybit.kernels import quant_gemm_wg as wg
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.rtn import QuantSpec, rtn_quantize

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _f32(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0]


def _bits32(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def _bf16_bits(v: float) -> int:
    return int(torch.tensor([v], dtype=torch.float32).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def _f16_halves(u: int) -> list[float]:
    bits = torch.tensor([(u >> 16 * i) & 0xFFFF for i in range(2)], dtype=torch.int32).to(torch.int16)
    return [float(v) for v in bits.view(torch.float16)]


def _f16_pack(vals) -> int:
    bits = torch.tensor(vals, dtype=torch.float32).to(torch.float16).view(torch.int16).to(torch.int32)
    bits = bits & 0xFFFF
    return int(bits[0]) | int(bits[1]) << 16


def _emulate_word(asm: str, *inputs: int) -> list[int]:
    """Run a per-word PTX block (``_wg_asm``: inputs word, s2, c2) on ints; the inputs are its last
    operands ``$n_out..``; returns the n_out output registers (16-bit halves)."""
    regs: dict = {}
    outs: dict = {}
    n_out = max(int(v) for v in re.findall(r"\$(\d+)", asm)) + 1 - len(inputs)
    for i, v in enumerate(inputs):
        regs[f"${n_out + i}"] = v
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}.":
            continue
        op, rest = line.split(None, 1)
        a = [t.strip() for t in rest.split(",")]

        def val(t):
            if t in regs:
                return regs[t]
            return int(t[2:], 16) if t.startswith("0f") else int(t, 0)  # 0fXXXXXXXX: float32 bits
        if op == "mov.b32" and a[0].startswith("{"):
            lo, hi = a[0].strip("{} "), a[1].strip("{} ")
            outs[lo], outs[hi] = regs[a[2]] & 0xFFFF, regs[a[2]] >> 16
        elif op == "mov.b32" and a[1].startswith("{"):  # pack two 16-bit registers
            regs[a[0]] = (val(a[1].strip("{} ")) & 0xFFFF) | (val(a[2].strip("{} ")) & 0xFFFF) << 16
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "xor.b32":
            regs[a[0]] = val(a[1]) ^ val(a[2])
        elif op == "sub.f16x2":  # exact here: small integers in fp16
            x, y = (_f16_halves(val(t)) for t in a[1:3])
            regs[a[0]] = _f16_pack([x[i] - y[i] for i in range(2)])
        elif op == "shr.u32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & 0xFFFFFFFF
        elif op == "lop3.b32":  # bit i = LUT bit (a_i << 2 | b_i << 1 | c_i)
            x, y, z, lut = (val(t) for t in a[1:5])
            regs[a[0]] = sum(((lut >> ((x >> i & 1) << 2 | (y >> i & 1) << 1 | (z >> i & 1))) & 1) << i
                             for i in range(32))
        elif op == "prmt.b32":
            by = [(val(t) >> 8 * i) & 0xFF for t in a[1:3] for i in range(4)]
            sel = val(a[3])
            regs[a[0]] = sum(by[(sel >> 4 * i) & 0xF] << 8 * i for i in range(4))
        elif op == "fma.rn.bf16x2":
            x, y, c = (_halves(val(t), True) for t in a[1:4])
            regs[a[0]] = _pack([x[i] * y[i] + c[i] for i in range(2)], True)
        elif op == "sub.rn.f32":
            regs[a[0]] = _bits32(float(torch.tensor(_f32(val(a[1])) - _f32(val(a[2])), dtype=torch.float32)))
        elif op == "fma.rn.f32":
            r = _f32(val(a[1])) * _f32(val(a[2])) + _f32(val(a[3]))
            regs[a[0]] = _bits32(float(torch.tensor(r, dtype=torch.float32)))
        elif op == "cvt.rn.bf16.f32":
            outs[a[0]] = _bf16_bits(_f32(val(a[1])))
        else:
            raise AssertionError(op)
    return [outs[f"${j}"] for j in range(n_out)]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ptx_gives_rounded_weights_in_natural_order(bits):
    """Output j = bf16 of ``s (q_j - C) + (C - z) s`` for code j of the word (natural K order)."""
    P, C = 32 // bits, 1 << (bits - 1)
    g = torch.Generator().manual_seed(bits)
    asm = wg._wg_asm(bits)
    for trial in range(40):
        q = torch.randint(0, 2 ** bits, (P,), generator=g).tolist()
        if trial == 0:
            q = [2 ** bits - 1] * P
        word = sum(c << (i * bits) for i, c in enumerate(q))
        s = float(torch.rand(1, generator=g)) * 0.05 + 1e-3
        z = int(torch.randint(0, 2 ** bits, (1,), generator=g))
        s2, c2 = _pack([s, s], True), _pack([(C - z) * s, (C - z) * s], True)
        sr, cr = _halves(s2, True)[0], _halves(c2, True)[0]
        got = _emulate_word(asm, word, s2, c2)
        want = [_bf16_bits(float(torch.tensor((qj - C) * sr + cr, dtype=torch.float32))) for qj in q]
        assert got == want, (trial, q, [hex(v) for v in got], [hex(v) for v in want])


def test_launcher_config_and_applicability():
    bm, bn, bk, st = wg.wg_config(16, 14336, 4096, 128)
    sk = wg.wg_split(16, 14336, 4096, bm, bn, bk, 132)
    assert bm == 16 and bn == 64 and 4096 // bk % sk == 0 and sk >= 2
    assert wg.wg_config(3, 4096, 14336, 128)[0] == 16
    assert wg.wg_config(1024, 4096, 14336, 128)[0] == 128
    assert wg.wg_split(1024, 4096, 14336, 128, 64, 64, 132) == 1  # no split-K sum at BLOCK_M 128
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    pw = rtn_quantize(torch.randn(128, 256), QuantSpec(4, 128, "uniform"))
    assert not wg.wg_applies(pw, 16, x)  # CPU tensors never take the Gluon path
    with pytest.raises(ValueError, match="quant_gemm_wg"):
        wg.quant_gemm_wg(x, pw, torch.empty(16, 128, dtype=torch.bfloat16))


@pytest.mark.skipif(wg.gluon is None, reason="needs Gluon (Triton >= 3.5)")
def test_sm90_compile_keeps_one_wgmma_group_in_flight():
    """The compiled kernel has async wgmma (HGMMA) whose loop waits for all but the newest group
    (``WARPGROUP.DEPBAR.LE gsb0, 0x1``; plain Triton emits ``0x0``) and TMA tile loads."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    # 4 warps: one 64-row block per warpgroup (else ptxas serializes)
    lines = sm90_sass(wg._quant_gemm_wg_kernel, dict(W0=4, STAGES=4, SPLIT=True, num_warps=4), 16, 64, 64, 4,
                      {"num_warps": 4})
    assert sum("HGMMA" in s for s in lines) >= 4
    assert any("WARPGROUP.DEPBAR.LE gsb0, 0x1" in s for s in lines)  # the loop's wait leaves one group
    assert any("UTMALDG" in s for s in lines)  # tiles come by TMA


def _rtn(N, K, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, "uniform")).to("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("M", [2, 5, 16, 40, 130, 300])
def test_wg_vs_reference(bits, group, M):
    pw = _rtn(384, 1152, bits, group, seed=bits + M)
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw, path="wg")
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("kw", [dict(split_k=3), dict(block_n=64, block_k=128, num_stages=5),
                                dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
                                dict(block_m=64, num_stages=3)])
def test_wg_variants_and_out_slice(kw):
    """Forced split-K (counters left at zero: a second call gives the same result), block sizes,
    stages, 8 warps; the output written into a column slice of a wider tensor."""
    pw = _rtn(384, 1152, 4, 128, seed=7)
    M = 48
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    wide = torch.zeros(M, 384 + 128, device="cuda", dtype=torch.bfloat16)
    y = quant_matmul(x, pw, out=wide[:, 64:448], path="wg", **kw)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(quant_matmul(x, pw, path="wg", **kw), y)
    assert wide[:, :64].abs().sum() == 0 and wide[:, 448:].abs().sum() == 0
