"""Register-A wgmma path (``path="ra"``, anybit/kernels/quant_gemm_ra.py). Gluon does not run under
the Triton interpreter, so on CPU: the per-(word, quad lane) PTX by bit-level emulation, the
launcher's rules, and an offline sm_90 compile whose loop must feed the wgmma from registers (no
shared-memory store of weights) and keep one wgmma group in flight. On CUDA (Hopper): the kernel
against ref_quant_matmul and against the shared-memory wgmma kernel (same weight arithmetic)."""

import os

import pytest
import torch
from sm90_sass import loop_bodies, nvdisasm, sm90_sass, wgmma_register_a_hazards  # same folder
from test_quant_gemm_h2 import _halves, _pack
from test_quant_gemm_wg import _bf16_bits, _emulate_word

from anybit.kernels import quant_gemm_ra as ra
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.rtn import QuantSpec, rtn_quantize

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_ptx_gives_codes_2q_and_2q1_of_the_word():
    """Quad lane q gets the bf16 weights ``s (q_j - 8) + (8 - z) s`` of codes j = 2q, 2q + 1 (natural
    K order: the wgmma register-A layout's K 2q, 2q + 1 within each 8), as quant_gemm_wg's PTX."""
    g = torch.Generator().manual_seed(4)
    asm = ra._ra_asm(4)
    for trial in range(40):
        codes = torch.randint(0, 16, (8,), generator=g).tolist()
        if trial == 0:
            codes = [15] * 8
        word = sum(c << (4 * i) for i, c in enumerate(codes))
        s = float(torch.rand(1, generator=g)) * 0.05 + 1e-3
        z = int(torch.randint(0, 16, (1,), generator=g))
        s2, c2 = _pack([s, s], True), _pack([(8 - z) * s, (8 - z) * s], True)
        sr, cr = _halves(s2, True)[0], _halves(c2, True)[0]
        for q in range(4):
            got = _emulate_word(asm, word, ra._ra_selector(q), s2, c2)
            want = [_bf16_bits(float(torch.tensor((codes[j] - 8) * sr + cr, dtype=torch.float32)))
                    for j in (2 * q, 2 * q + 1)]
            assert got == want, (trial, q, codes, [hex(v) for v in got], [hex(v) for v in want])


def test_launcher_config_and_applicability():
    assert ra.ra_config(64, 4096, 14336, 128, 132) == (64, 64, 64, 4, 4)  # s12-4 sweep: one warpgroup
    assert ra.ra_config(1024, 4096, 14336, 128, 132)[:2] == (256, 128)  # two sharing the x tile
    assert ra.ra_config(256, 4096, 14336, 128, 132)[0] == 128  # 256 would leave SMs idle (no split-K)
    for M in (16, 64, 256, 1024):
        bm, bn, bk, st, warps = ra.ra_config(M, 14336, 4096, 128, 132)
        assert ra.ra_shared_bytes(bm, bn, bk, st) <= 227 * 1024 and bn == 16 * warps
    assert ra.ra_split(1024, 4096, 14336, 256, 128, 64, 8, 132) == 1  # no split-K at BLOCK_M 256
    sk = ra.ra_split(64, 4096, 14336, 64, 64, 64, 4, 132)
    assert 64 * sk <= 2 * 132 < 64 * sk * 2 and (14336 // 64) % sk == 0  # one wave, 2 programs per SM
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    pw = rtn_quantize(torch.randn(128, 256), QuantSpec(4, 128, "uniform"))
    assert not ra.ra_applies(pw, 16, x)  # CPU tensors never take the Gluon path
    with pytest.raises(ValueError, match="quant_gemm_ra"):
        ra.quant_gemm_ra(x, pw, torch.empty(16, 128, dtype=torch.bfloat16))


@pytest.mark.skipif(ra.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bm,bn,warps", [(16, 64, 4), (128, 128, 8), (64, 256, 8), (256, 128, 8)])
def test_sm90_loop_feeds_wgmma_from_registers(bm, bn, warps):
    """The compiled K loop: 4 HGMMA per m64 block and 64-wide K tile with the A operand in
    registers (``HGMMA.64xNx16.F32.BF16 Racc, Ra``); no STS / STSM of an A tile, no spills; and no
    instruction writes a register that an HGMMA in flight reads as A (session 12's first version
    did: the LDS of the next tile's table reused them, and BLOCK_M 256 gave wrong sums)."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    consts = dict(W0=4, STAGES=4, SPLIT=True, SUM_LOADS=1, num_warps=warps)
    lines = sm90_sass(ra._quant_gemm_ra_kernel, consts, bm, bn, 64, 4, {"num_warps": warps})
    # the K loop: the shortest branch-back range with HGMMA (the mbarrier retry paths sit at the
    # end of the kernel and branch back into it, giving longer ranges)
    loop = min((b for b in loop_bodies(lines) if any("HGMMA" in s for s in b)), key=len)
    mma = [i for i, s in enumerate(loop) if "HGMMA" in s]
    assert len(mma) == 4 * bn // (16 * warps) and all(loop[i].split()[2].startswith("R") for i in mma)
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    assert not any(op.startswith(("STS", "STL", "LDL")) for op in ops)  # no A tile store, no spills
    assert wgmma_register_a_hazards(loop) == []
    assert any("UTMALDG" in s for s in lines)  # x, words and table come by TMA


def _rtn(N, K, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(4, group, "uniform")).to("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("M", [2, 5, 16, 40, 130, 300])
def test_ra_vs_reference_and_wg(group, M):
    pw = _rtn(384, 1152, group, seed=M)
    x = torch.randn(M, 1152, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    y = quant_matmul(x, pw, path="ra")
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    y_wg = quant_matmul(x, pw, path="wg", block_k=64, split_k=1)  # same bf16 weights, same K tiles
    y_ra = quant_matmul(x, pw, path="ra", split_k=1)
    assert float((y_ra.float() - y_wg.float()).norm() / y_wg.float().norm()) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("kw", [dict(split_k=3), dict(block_m=256, num_stages=3),
                                dict(block_m=64, num_stages=2), dict(block_k=128, split_k=2),
                                dict(block_n=64, num_warps=4), dict(block_n=128, num_warps=4, block_m=32),
                                dict(block_n=256, block_m=128, num_warps=8)])
def test_ra_variants_and_out_slice(kw):
    """Forced split-K (counters left at zero: a second call gives the same result), BLOCK_M 256,
    2-3 stages, BLOCK_K 128, one warpgroup with one or two m64 blocks, two warpgroups with two;
    the output written into a column slice of a wider tensor."""
    pw = _rtn(384, 1152 * 2, 128, seed=7)
    M = 200
    x = torch.randn(M, 1152 * 2, device="cuda", dtype=torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    wide = torch.zeros(M, 384 + 128, device="cuda", dtype=torch.bfloat16)
    y = quant_matmul(x, pw, out=wide[:, 64:448], path="ra", **kw)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(quant_matmul(x, pw, path="ra", **kw), y)
    assert wide[:, :64].abs().sum() == 0 and wide[:, 448:].abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
def test_ra_random_codes_real_shape():
    """4096 x 14336 with uniformly random codes (every nibble value in every position) at M 64 and
    1024 (BLOCK_M 256) against the float32 dequantization."""
    from anybit.quant.format import dequantize
    from benchmarks.bench_quant_matmul import random_packed
    pw = random_packed(4096, 14336, 4)
    wd = dequantize(pw, torch.float32)
    for M in (64, 1024):
        x = torch.randn(M, 14336, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wd.t()
        y = quant_matmul(x, pw, path="ra")
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2, M


def test_hazard_check_finds_a_register_reused_across_the_back_edge():
    """The SASS check itself: a group left in flight by ``DEPBAR.LE gsb0, 0x1`` at the branch back
    is still in flight at the top of the loop, where writing one of its A registers is a hazard; a
    ``0x0`` wait before the branch clears it."""
    body = ["LDS R154, [R4+0x24000]", "WARPGROUP.ARRIVE",
            "HGMMA.64x256x16.F32.BF16 R24, R152, gdesc[UR4], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
            "BRA `(.L_x_2)"]
    assert wgmma_register_a_hazards(body) == ["LDS R154, [R4+0x24000]"]
    body[3] = "WARPGROUP.DEPBAR.LE gsb0, 0x0"
    assert wgmma_register_a_hazards(body) == []
    lines = ["MOV R1, R2", "// label .L_x_2", *body, "EXIT"]
    assert loop_bodies(lines) == [body]
