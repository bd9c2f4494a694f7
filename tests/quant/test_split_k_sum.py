"""split_k_sum (the split-K partials added by a second kernel) against its reference, and the packed-half
GEMV ending with it (``defer``) against the GEMV's own last-program sum. CPU: Triton's interpreter."""

import pytest
import torch

from anybit.kernels.quant_matmul import ref_quant_matmul
from anybit.kernels.split_k_sum import ref_split_k_sum, split_k_sum
from anybit.quant.rtn import QuantSpec, rtn_quantize

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("split, M, N", [(1, 1, 37), (2, 3, 300), (5, 1, 128), (16, 2, 129), (16, 3, 1000)])
def test_split_k_sum_adds_in_split_order_into_a_column_slice(monkeypatch, split, M, N):
    """Odd N (partial blocks; 3 x 1000 outputs with one program per SM: programs that take several blocks),
    a y that is a column slice of a wider buffer (row stride > N):
    the kernel's float32 result is the reference's bit for bit (split 0 + split 1 + ...), nothing outside
    the slice is written; bf16 y is that sum converted once."""
    import anybit.kernels.split_k_sum as sks

    if N == 1000:
        monkeypatch.setattr(sks, "SUM_PER_SM", 1)
    g = torch.Generator().manual_seed(split * 100 + N)
    ws = (torch.randn(split, M, N, generator=g) * torch.logspace(-3, 3, N)).to(DEV)
    want = ref_split_k_sum(ws, torch.empty(M, N, device=DEV))
    seq = ws[0].clone()
    for s in range(1, split):
        seq += ws[s]
    assert torch.equal(want, seq)
    for dtype in (torch.float32, torch.bfloat16):
        wide = torch.full((M, N + 50), float("nan"), device=DEV, dtype=dtype)
        out = split_k_sum(ws, wide[:, 20:20 + N], pdl=False)
        assert out.data_ptr() == wide[:, 20:].data_ptr()
        got = wide[:, 20:20 + N]
        if dtype == torch.float32 or CUDA:
            assert torch.equal(got, want.to(dtype))
        else:  # the interpreter's float32 -> bf16 conversion truncates: within one bf16 step
            assert ((got.float() - want).abs() <= want.abs() * 2 ** -7).all()
        assert torch.isnan(wide[:, :20].float()).all() and torch.isnan(wide[:, 20 + N:].float()).all()


def test_split_k_sum_rejects_bad_buffers():
    ws = torch.zeros(2, 1, 64, device=DEV)
    with pytest.raises(ValueError, match="ws must be"):
        split_k_sum(ws.half(), torch.empty(1, 64, device=DEV))
    with pytest.raises(ValueError, match="ws must be"):
        split_k_sum(torch.zeros(2, 1, 128, device=DEV)[:, :, ::2], torch.empty(1, 64, device=DEV))
    with pytest.raises(ValueError, match="y must be"):
        split_k_sum(ws, torch.empty(1, 63, device=DEV))
    with pytest.raises(ValueError, match="y must be"):
        split_k_sum(ws, torch.empty(1, 128, device=DEV)[:, ::2])


@pytest.mark.parametrize("bits, split, N", [(4, 4, 80), (2, 3, 200), (8, 2, 64), (3, 3, 96), (6, 4, 40)])
def test_gemv_h2_deferred_sum_matches_the_last_program_sum(bits, split, N):
    """quant_gemv_h2(defer=True): partials added by split_k_sum after the GEMV. Within one bf16 step of the
    last-program sum (which adds 16 partials per tree reduction, another order), both near the reference;
    repeated calls give the same bits; the output slice of a wider y only."""
    from anybit.kernels.quant_gemv_h2 import quant_gemv_h2

    K = 512
    pw = rtn_quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(bits)),
                      QuantSpec(bits, 64, "uniform")).to(DEV)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(split)).to(DEV, torch.bfloat16)
    ref = ref_quant_matmul(x.float(), pw)
    y = torch.empty(1, N, device=DEV, dtype=torch.bfloat16)
    last = quant_gemv_h2(x, pw, y, split_k=split, defer=False)
    wide = torch.full((1, N + 24), float("nan"), device=DEV, dtype=torch.bfloat16)
    out = quant_gemv_h2(x, pw, wide[:, 8:8 + N], split_k=split, defer=True)
    again = quant_gemv_h2(x, pw, torch.empty_like(last), split_k=split, defer=True)
    assert torch.equal(out, again)
    assert torch.isnan(wide[:, :8].float()).all() and torch.isnan(wide[:, 8 + N:].float()).all()
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
    step = last.float().abs() * 2 ** -7 + 1e-6
    assert ((out.float() - last.float()).abs() <= step).all()


def test_defer_default_rule(monkeypatch):
    """auto: the mma.sync kernel for DEFER_MMA's (M range, widths), the GEMV for DEFER_H2_BITS; "kernel" /
    "last" override it for every call."""
    import anybit.kernels.split_k_sum as sks

    monkeypatch.setattr(sks, "SPLIT_SUM_MODE", "auto")
    assert sks.defer_default("mma", 4, 4) and sks.defer_default("mma", 8, 16)
    assert sks.defer_default("mma", 3, 2)
    assert sks.defer_default("mma", 2, 4) and sks.defer_default("mma", 2, 16)
    assert not sks.defer_default("mma", 7, 4) and not sks.defer_default("mma", 1, 16)
    assert sks.defer_default("mma", 2, 1) and sks.defer_default("mma", 4, 1)
    assert not sks.defer_default("mma", 3, 1)
    assert sks.defer_default("mma", 2, 24) and sks.defer_default("mma", 4, 32)
    assert not sks.defer_default("mma", 4, 33) and not sks.defer_default("mma", 4, 64)
    assert sks.defer_default("h2", 8, 1) and not sks.defer_default("h2", 3, 1)
    monkeypatch.setattr(sks, "SPLIT_SUM_MODE", "kernel")
    assert sks.defer_default("mma", 2, 1) and sks.defer_default("h2", 3, 1)
    monkeypatch.setattr(sks, "SPLIT_SUM_MODE", "last")
    assert not sks.defer_default("mma", 4, 4) and not sks.defer_default("h2", 8, 1)
