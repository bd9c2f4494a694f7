"""quant_matmul (Triton; interpreter on CPU) vs ref_quant_matmul and vs a float dequantization."""

import pytest
import torch

from anybit.kernels.quant_matmul import quant_matmul, ref_quant_matmul
from anybit.quant.format import dequantize
from anybit.quant.rtn import QuantSpec, rtn_quantize

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _packed(N, K, bits, group, fmt="uniform", seed=0):
    g = torch.Generator().manual_seed(seed)
    return rtn_quantize(torch.randn(N, K, generator=g), QuantSpec(bits, group, fmt)).to(DEV)


def _check(y, ref, tol):
    assert torch.isfinite(y).all()
    err = float((y.float() - ref.float()).norm() / ref.float().norm())
    assert err < tol, err


# every bit width, odd M; N and K multiples of the group size but not of 256
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("M", [1, 3, 33])
def test_every_bit_width(bits, M):
    pw = _packed(96, 384, bits, 128, seed=bits)
    x = torch.randn(M, 384, device=DEV)
    ref = ref_quant_matmul(x, pw)
    dense = x @ dequantize(pw).to(DEV).t()
    y = quant_matmul(x, pw)
    _check(y, ref, 1e-5 if not CUDA else 5e-3)
    _check(y, dense, 1e-5 if not CUDA else 5e-3)


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("path", ["gemv", "gemm", "dequant"])
def test_group_sizes_and_paths(group, path):
    K = 160 if group in (32, -1) else 192 if group == 64 else 384
    pw = _packed(80, K, 3, group, seed=group % 7)
    x = torch.randn(3 if path != "gemv" else 1, K, device=DEV)
    _check(quant_matmul(x, pw, path=path), ref_quant_matmul(x, pw), 1e-5 if not CUDA else 5e-3)


@pytest.mark.parametrize("fmt, bits", [("nf4", 4), ("fp4", 4), ("learned", 3), ("learned", 5)])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_codebooks(fmt, bits, path):
    pw = _packed(64, 192, bits, 64, fmt, seed=3)
    x = torch.randn(1 if path == "gemv" else 5, 192, device=DEV)
    _check(quant_matmul(x, pw, path=path), ref_quant_matmul(x, pw), 1e-5 if not CUDA else 5e-3)


def test_split_k_and_out_column_slice():
    pw = _packed(96, 384, 4, 32, seed=5)
    x = torch.randn(2, 384, device=DEV)
    ref = ref_quant_matmul(x, pw)
    for path in ("gemv", "gemm"):
        out = torch.full((2, 160), float("nan"), device=DEV)
        quant_matmul(x, pw, out=out[:, 32:128], path=path, split_k=4)
        _check(out[:, 32:128], ref, 1e-5 if not CUDA else 5e-3)
        assert torch.isnan(out[:, :32]).all() and torch.isnan(out[:, 128:]).all()


def test_act_order_permutation():
    pw = _packed(32, 128, 4, 32, seed=9)
    pw.perm = torch.randperm(128, generator=torch.Generator().manual_seed(0)).to(DEV)
    x = torch.randn(2, 128, device=DEV)
    dense = x @ dequantize(pw).to(DEV).t()
    _check(quant_matmul(x, pw), dense, 1e-5 if not CUDA else 5e-3)
    _check(ref_quant_matmul(x, pw), dense, 1e-6)


def test_input_errors():
    pw = _packed(32, 64, 4, 32)
    with pytest.raises(ValueError, match="x: expected"):
        quant_matmul(torch.randn(2, 65, device=DEV), pw)
    with pytest.raises(ValueError, match="out: expected"):
        quant_matmul(torch.randn(2, 64, device=DEV), pw, out=torch.empty(2, 31, device=DEV))
    with pytest.raises(ValueError, match="path"):
        quant_matmul(torch.randn(2, 64, device=DEV), pw, path="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 7, 12, 64, 300])
def test_gpu_half_inputs(dtype, M):
    for bits in (2, 3, 4, 8):
        pw = _packed(512, 1024, bits, 128, seed=bits)
        x = torch.randn(M, 1024, device="cuda", dtype=dtype)
        _check(quant_matmul(x, pw), ref_quant_matmul(x.float(), pw), 1e-2)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("swap", [True, False])
def test_experimental_fast_dequant(bits, swap):
    pw = _packed(96, 384, bits, 128, seed=11 + bits)
    x = torch.randn(5, 384, device=DEV)
    y = quant_matmul(x, pw, path="gemm", swap=swap, fast_dequant=True)
    _check(y, ref_quant_matmul(x, pw), 1e-5 if not CUDA else 5e-3)


@pytest.mark.parametrize("bits,N,M,want", [(8, 14336, 4, False), (8, 14336, 12, True), (8, 128256, 16, True),
                                           (4, 14336, 4, False), (4, 4096, 4, True), (8, 14336, 400, False)])
def test_wgmma_routing_by_width_and_width_of_output(monkeypatch, bits, N, M, want):
    """At M <= 16 "auto" keeps wide outputs (N > WG_SMALL_N) off the wgmma kernel only where the
    mma.sync kernel takes the width (it is chosen first there); W8 only up to MMA_W8_MAX_M (H100
    s23-1), above it wgmma (s11-4). Above WG_MAX_M never."""
    from anybit.kernels import quant_matmul as qm
    from anybit.quant.format import PackedWeight
    monkeypatch.setattr(qm, "WG_AUTO", True)
    monkeypatch.setattr(qm, "wg_applies", lambda packed, M, x: True)  # CPU: only the routing rule
    K = 128
    pw = PackedWeight(torch.zeros(bits * K // 32, N, dtype=torch.int32), torch.ones(1, N).half(),
                      torch.zeros(1, N).half(), bits, 128, K, N)
    assert qm.wg_chosen(pw, M, torch.empty(M, K)) == want


@pytest.mark.parametrize("bits,N,K,M,pending,want", [
    (4, 6144, 4096, 24, False, True), (6, 6144, 4096, 32, False, False), (6, 4096, 4096, 32, True, True),
    (4, 14336, 4096, 24, True, True), (8, 14336, 4096, 24, True, False), (4, 14336, 4096, 24, False, False),
    (4, 6144, 4096, 33, True, False), (6, 4096, 14336, 24, True, True),
    (3, 6144, 4096, 32, False, True), (3, 4096, 14336, 24, True, True), (3, 14336, 4096, 32, False, True),
    (3, 14336, 4096, 33, True, False), (6, 14336, 4096, 1, False, True), (6, 14336, 4096, 1, True, False),
    (5, 14336, 4096, 1, False, False), (6, 6144, 4096, 1, True, False), (3, 6144, 4096, 1, True, False),
    (3, 6144, 4096, 1, False, True), (6, 28672, 4096, 1, False, False), (6, 128256, 4096, 1, False, False),
    (6, 6144, 4096, 1, False, True), (5, 6144, 4096, 1, True, False), (5, 6144, 4096, 1, False, True),
    (8, 6144, 4096, 12, False, False), (8, 6144, 4096, 8, True, True), (8, 6144, 4096, 8, False, False),
    (8, 6144, 4096, 4, False, True), (8, 14336, 4096, 1, False, True),
    (8, 14336, 4096, 1, True, False), (8, 4096, 14336, 1, False, False),
    (2, 4096, 14336, 1, True, True), (5, 4096, 14336, 1, True, True), (4, 4096, 14336, 1, True, False),
    (6, 4096, 14336, 1, True, False), (2, 28672, 4096, 1, True, False), (5, 28672, 4096, 1, True, False),
    (4, 4096, 4096, 48, True, True), (2, 4096, 4096, 64, True, True), (6, 4096, 4096, 33, True, False),
    (4, 4096, 4096, 48, False, False), (3, 4096, 4096, 48, True, False), (5, 4096, 4096, 64, True, False),
    (4, 6144, 4096, 48, True, False), (4, 4096, 4096, 65, True, False), (2, 2048, 2048, 40, True, True)])
def test_mma_routing_above_16_rows_and_for_w8(monkeypatch, bits, N, K, M, pending, want):
    """"auto" takes the mma.sync kernel at M 17..32 for weights up to 8192 x 8192 (qkv, o_proj), as pending
    sums for every width and writing y for W2/W4/W8 (H100 s23-3/4), as pending sums of W2 / W4 / W5 / W6 on
    every shape (s27-13; writing y there: rws), and merged W3 on every shape, y too (s26-4); pending sums of
    W2 / W4 at M 33..64 on weights up to 4096 x 4096 (o_proj; s27-15, s28-4); W8 at M 2..8
    as pending sums, 2..4 writing y (s23-1, s23-11), and at M = 1 writing y where no split-K is needed
    (s23-6: not on 4096 x 14336); merged W3 / W5 / W6 at M = 1 writing y where the grid fits 3 programs per
    SM (pending sums keep the GEMV: s27-1/2), and W6 writing y on a 3-per-SM grid elsewhere where that grid
    still splits K (s26-14; not gate_up's 28672 outputs or lm_head: s27-2); as pending sums W2 / W5 on
    down_proj-like weights (K >= 2 N, s27-1..4)."""
    from anybit.kernels import quant_gemv_mma as mm
    from anybit.kernels import quant_matmul as qm
    from anybit.quant.format import PackedWeight
    monkeypatch.setattr(qm, "mma_applies", lambda packed, M, x: True)  # CPU: only the routing rule
    monkeypatch.setattr(qm, "MMA_MODE", "2")
    monkeypatch.setattr(qm, "_num_sms", lambda device: 132)
    monkeypatch.setattr(qm, "MMA_W3_HB", True)
    monkeypatch.setattr(qm, "MMA_HB_BITS", (3, 5, 6))
    monkeypatch.setattr(qm, "MMA_HB_PENDING_BITS", ())
    monkeypatch.setattr(qm, "MMA_M1_PENDING_DOWN_BITS", (2, 5))
    monkeypatch.setattr(qm, "MMA_WIDE_PENDING_BITS", (2, 4, 5, 6))
    monkeypatch.setattr(qm, "MMA_SQUARE_PENDING_BITS", (2, 4))
    monkeypatch.setattr(mm, "MMA_HB_BITS", (3, 5, 6))
    pw = PackedWeight(torch.zeros(bits * K // 32, N, dtype=torch.int32), torch.ones(1, N).half(),
                      torch.zeros(1, N).half(), bits, K, K, N)
    assert qm.mma_chosen(pw, M, torch.empty(M, K), pending=pending) == want


@pytest.mark.parametrize("bits,M,want", [(4, 63, False), (4, 64, True), (4, 512, True), (4, 513, False),
                                         (8, 128, False), (2, 128, False)])
def test_register_a_routing(monkeypatch, bits, M, want):
    """"auto" takes the register-A wgmma kernel for W4 at RA_MIN_M..RA_MAX_M (64..512; H100 s12-5),
    where the kernel applies (Hopper, bf16 x: wg_applies, stubbed here); other widths never."""
    from anybit.kernels import quant_gemm_ra
    from anybit.kernels import quant_matmul as qm
    from anybit.quant.format import PackedWeight
    monkeypatch.setattr(qm, "RA_AUTO", True)
    monkeypatch.setattr(quant_gemm_ra, "wg_applies", lambda packed, M, x: True)  # CPU: only the rule
    K, N = 128, 256
    pw = PackedWeight(torch.zeros(bits * K // 32, N, dtype=torch.int32), torch.ones(1, N).half(),
                      torch.zeros(1, N).half(), bits, 128, K, N)
    assert qm.ra_chosen(pw, M, torch.empty(M, K)) == want


@pytest.mark.parametrize("bits,M,N,want", [(4, 16, 256, False), (4, 17, 256, True), (4, 1024, 256, True),
                                           (4, 1025, 256, False), (4, 128, 192, False), (8, 128, 256, True),
                                           (2, 128, 256, True), (3, 64, 256, True), (6, 1024, 256, True),
                                           (7, 17, 256, True), (1, 300, 256, True), (5, 16, 256, True),
                                           (5, 8, 256, False), (3, 9, 256, True), (4, 9, 256, False),
                                           (8, 16, 256, False)])
def test_register_a_ws_routing(monkeypatch, bits, M, N, want):
    """"auto" takes the warp-specialized register-A kernel (quant_gemm_rws) for 1..8 bits at
    RWS_MIN_M..RWS_MAX_M (17..1024) rows, where N is a multiple of 128 (two 64-row halves per tile) and the
    Gluon conditions hold (stubbed here, the width check kept). Above, dequantize + cuBLAS wins (s20-11);
    at M <= 16 the mma.sync kernels stay (s21-6) where they apply (the launcher asks rws only after them),
    and from M 9 rws is preferred to the Triton GEMM for widths without a wgmma kernel (not 2/4/8 bits)."""
    from anybit.kernels import quant_gemm_rws
    from anybit.kernels import quant_matmul as qm
    from anybit.quant.format import PackedWeight
    monkeypatch.setattr(qm, "RWS_AUTO", True)
    # CPU: only the rule (the width check stays)
    monkeypatch.setattr(quant_gemm_rws, "wg_applies", lambda packed, M, x, widths: packed.bits in widths)
    K = 128
    pw = PackedWeight(torch.zeros(bits * K // 32, N, dtype=torch.int32), torch.ones(1, N).half(),
                      torch.zeros(1, N).half(), bits, 128, K, N)
    assert qm.rws_chosen(pw, M, torch.empty(M, K)) == want
