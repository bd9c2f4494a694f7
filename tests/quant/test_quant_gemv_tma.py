"""TMA-ring variant of the mma.sync GEMV (anybit/kernels/quant_gemv_tma.py). On CPU: the launcher's
rules, the shared-memory read layout (its relabelling must be quant_gemv_mma's register layout) and
an offline sm_90 compile (one TMA per tile in the loop, 16-byte shared loads, HMMA, no spills, no
layout round trips through shared memory). On CUDA (Hopper): against ref_quant_matmul."""

import os

import pytest
import torch
from sm90_sass import loop_bodies, nvdisasm, shared_bytes, sm90_sass_ptrs

from anybit.kernels import quant_gemv_mma as mm
from anybit.kernels import quant_gemv_tma as mt
from anybit.kernels import quant_matmul as qm
from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.rtn import QuantSpec, rtn_quantize

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_launcher_config_and_applicability():
    # W4 M 1 on 4096x14336: 128 / 8 columns x 8 K chunks per program, 256 tiles x 2 splits (4 per SM)
    assert mt.tma_config(1, 4096, 14336, 128, 132) == (8, 128, 2, 8)
    # M 16 with 4 programs per SM (the register cap) splits K further than quant_gemv_mma (3 per SM)
    assert mt.tma_config(16, 4096, 14336, 128, 132)[2] == 16
    assert mm.mma_config(16, 4096, 14336, 128, 132)[2] == 8
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    pw = rtn_quantize(torch.randn(128, 256), QuantSpec(4, 128, "uniform"))
    assert not mt.tma_applies(pw, 1, x)  # CPU tensors never take the Gluon path
    assert not qm.tma_chosen(pw, 12, torch.randn(12, 256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="quant_gemv_tma"):
        mt.quant_gemv_tma(x, pw, torch.empty(1, 128, dtype=torch.bfloat16))


@pytest.mark.skipif(mt.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("R,KS", [(16, 1), (16, 8), (8, 2), (4, 4)])
def test_shared_read_layout_relabels_to_the_register_layout(R, KS):
    """Element (row kr R + r, column c) of a ring slot, read with ``_smem_words_layout``, must land in
    the register, lane and warp where ``_words_layout`` keeps word (r, kr CW + c)."""
    from triton._C.libtriton import gluon_ir, ir

    ctx = ir.context()
    ir.load_dialects(ctx)
    builder = gluon_ir.GluonOpBuilder(ctx)
    words = builder.to_linear_layout(mm._words_layout.fn(R, 128)._to_ir(builder), [R, 128])
    smem = mt._smem_words_layout.fn(R, KS)
    CW = 128 // KS

    def relabel(b):  # slot coordinates -> word coordinates
        return [b[0] % R, (b[0] // R) * CW + b[1]]

    for mine, want in ((smem.reg_bases, words.reg_bases), (smem.lane_bases, words.lane_bases),
                       (smem.warp_bases, words.warp_bases)):
        assert [relabel(b) for b in mine] == [list(b) for b in want]


def _compile(bits, bm, ks, split, acc=False, x_tma=False):
    ptrs = {"x_ptr": "*bf16", "s_ptr": "*fp16", "z_ptr": "*fp16", "y_ptr": "*fp32" if acc else "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    rows = ks * 128 * bits // 32
    ptrs["w_desc"] = f"desc:int32:{14336 * bits // 32}x4096:{rows}x{128 // ks}"
    if x_tma:
        ptrs["x_desc"] = f"desc:bfloat16:16x14336:{bm}x128"
    mr = (bm // ks if ks > 1 else 0)
    consts = dict(W0=bits, BLOCK_M=bm, BLOCK_K=128, SPLIT=split, PDL=True, STAGES=4, ACC=acc, KS=ks, MR=mr,
                  X_TMA=x_tma)
    return sm90_sass_ptrs(mt._quant_gemv_tma_kernel, consts, ptrs,
                          {"num_warps": 4, "maxnreg": mt.TMA_MAX_REGISTERS})


@pytest.mark.skipif(mt.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,bm,ks", [(4, 8, 8), (4, 16, 1), (2, 8, 1), (1, 16, 1)])
def test_sm90_compile_streams_words_through_the_ring(bits, bm, ks):
    """The loop: one TMA (UTMALDG) per tile, the tile's words as 16-byte shared loads, the MMA chain,
    no stores to shared memory (the relabelling moves no data) and no spills under the register
    cap; the ring is 4 slots of the tile's words."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    lines = _compile(bits, bm, ks, True)
    loop = min((b for b in loop_bodies(lines) if any("UTMALDG" in s for s in b)), key=len)  # the K loop
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    assert sum(o.startswith("UTMALDG") for o in ops) == 1
    assert sum(o == "LDS.128" for o in ops) == bits  # R = 4 bits word rows x 128 columns: 4 bits words each
    assert sum(o.startswith("HMMA.16816.F32.BF16") for o in ops) == 16 * bm // 8
    assert not any(o.startswith(("STS", "LDSM", "STSM", "SHFL")) for o in ops)
    all_ops = [s.split()[0] for s in lines if not s.startswith("//")]
    assert not any(o.startswith(("STL", "LDL")) for o in all_ops)
    assert shared_bytes(lines) >= 4 * (4 * bits) * 128 * 4


@pytest.mark.skipif(mt.gluon is None, reason="needs Gluon (Triton >= 3.5)")
@pytest.mark.parametrize("bits,bm", [(4, 16), (2, 8)])
def test_sm90_compile_x_rides_in_the_ring(bits, bm):
    """X_TMA: two TMA copies per tile (words and x) on one barrier, x read from shared memory (no
    global load of x in the loop: the loop's only LDGs are the scales and zero points), no spills."""
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    lines = _compile(bits, bm, 1, True, x_tma=True)
    loop = min((b for b in loop_bodies(lines) if any("UTMALDG" in s for s in b)), key=len)
    ops = [s.split()[1] if s.startswith("@") else s.split()[0] for s in loop if not s.startswith("//")]
    assert sum(o.startswith("UTMALDG") for o in ops) == 2
    assert sum(o.startswith("LDS") for o in ops) >= bits + 4  # words, then 4 x 16 bytes of x per thread
    assert not any(o.startswith("LDG.E.128") for o in ops)
    all_ops = [s.split()[0] for s in lines if not s.startswith("//")]
    assert not any(o.startswith(("STL", "LDL")) for o in all_ops)
    assert shared_bytes(lines) >= 4 * ((4 * bits) * 128 * 4 + bm * 128 * 2)


@pytest.mark.skipif(mt.gluon is None, reason="needs Gluon (Triton >= 3.5)")
def test_sm90_accumulating_epilogue_is_fire_and_forget():
    if not os.path.exists(nvdisasm()):
        pytest.skip("no nvdisasm in this Triton install")
    ops = [s.split()[0] for s in _compile(4, 8, 8, True, acc=True) if not s.startswith("//")]
    assert sum(o.startswith("RED") for o in ops) >= 1
    assert not any(o.startswith(("ATOM", "LDL", "STL")) for o in ops)


def _rtn(N, K, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, "uniform")).to("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER or mt.gluon is None, reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("group", [64, 128, -1])
def test_matches_reference(bits, M, group):
    N, K = 384, 2048
    pw = _rtn(N, K, bits, group, seed=M + bits)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.bfloat16)
    if group == 64 and bits == 1:  # a 1-bit word holds 32 K: groups of 128 K at least
        assert not mt.tma_applies(pw, M, x)
        return
    assert mt.tma_applies(pw, M, x)
    want = ref_quant_matmul(x.float(), pw)
    tol = 1e-2 * want.abs().max().item() + 1e-3
    kws = [{}, dict(split_k=1), dict(split_k=3), dict(stages=2), dict(stages=6)]
    if M > 1:  # the x tiles through the ring (KS 1) or as global loads
        kws += [dict(x_tma=True, split_k=3), dict(x_tma=True, stages=2), dict(x_tma=False)]
    bm, bk, _, _ = mt.tma_config(M, N, K, pw.group_size, 132)
    kws += [dict(ks=ks, split_k=s) for ks in (2, 4, 8) for s in (None, 1, 2)
            if mm.ks_fits(ks, M, bm, K, pw.group_size, bk)]
    nan = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    for kw in kws:
        y = mt.quant_gemv_tma(x, pw, nan.clone(), **kw)
        assert (y.float() - want).abs().max().item() <= tol, kw
        again = mt.quant_gemv_tma(x, pw, torch.empty_like(y), **kw)
        assert torch.equal(y, again), kw  # fixed split-K sum order
    # the same products and sums as quant_gemv_mma on one group per tile (groups of 64: its 128-K tiles of
    # two groups, G2, add the two halves in another order)
    ref_mma = mm.quant_gemv_mma(x, pw, nan.clone(), split_k=1, ks=1, two_groups=False)
    y = mt.quant_gemv_tma(x, pw, torch.empty_like(ref_mma), split_k=1, ks=1)
    assert torch.equal(y, ref_mma)
    if M > 1:
        y = mt.quant_gemv_tma(x, pw, torch.empty_like(ref_mma), split_k=1, ks=1, x_tma=True)
        assert torch.equal(y, ref_mma)
    else:
        with pytest.raises(ValueError, match="x_tma needs ks 1"):
            mt.quant_gemv_tma(x, pw, torch.empty_like(ref_mma), ks=2, x_tma=True)
    acc = torch.zeros(M, N, dtype=torch.float32, device="cuda")
    mt.quant_gemv_tma(x, pw, None, acc=acc, split_k=2)  # pending sums (float atomics)
    assert (acc - want).abs().max().item() <= tol
    assert torch.equal(quant_matmul(x, pw, path="tma"), mt.quant_gemv_tma(x, pw, torch.empty_like(y)))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER or mt.gluon is None, reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("M", [8, 9, 16])
def test_auto_routes_wide_weights_at_m_9_to_16(M):
    """"auto" takes this kernel for M 9..16 on weights at least TMA_MIN_N wide (lm_head, the fused
    gate_up), not on an unfused MLP projection (N 14336: the mma.sync kernel was faster, s17-6)."""
    pw = _rtn(qm.TMA_MIN_N, 512, 4, 128, seed=M)
    x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
    assert not qm.tma_chosen(_rtn(14336, 512, 4, 128, seed=M), M, x)
    assert qm.tma_chosen(pw, M, x) == (M >= qm.TMA_MIN_M and qm.TMA_AUTO)
    if qm.tma_chosen(pw, M, x):
        assert torch.equal(quant_matmul(x, pw), quant_matmul(x, pw, path="tma"))
    want = ref_quant_matmul(x.float(), pw)
    assert (quant_matmul(x, pw).float() - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3

