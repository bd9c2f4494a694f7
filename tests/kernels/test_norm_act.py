"""RMSNorm, fused add + RMSNorm and SiLU-and-mul: Triton kernel vs ref_ (interpreter on CPU)."""

import pytest
import torch

from anybit.kernels.activation import ref_silu_and_mul, silu_and_mul
from anybit.kernels.rms_norm import fused_add_rms_norm, ref_fused_add_rms_norm, ref_rms_norm, rms_norm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 100), (129, 48)])
def test_rms_norm(device, dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype).to(device)
    w = (1 + torch.randn(hidden, generator=g) * 0.1).to(dtype).to(device)
    y = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, ref_rms_norm(x, w, 1e-6), atol=TOL[dtype], rtol=TOL[dtype])
    r = torch.randn(rows, hidden, generator=g).to(dtype).to(device)
    y2, nr = fused_add_rms_norm(x, r, w, 1e-5)
    ry, rr = ref_fused_add_rms_norm(x, r, w, 1e-5)
    # exact on GPU and in fp32; the interpreter truncates fp32 -> bf16 instead of rounding
    exact = dtype == torch.float32 or device == "cuda"
    torch.testing.assert_close(nr, rr, atol=0 if exact else 1e-2, rtol=0 if exact else 1e-2)
    torch.testing.assert_close(y2, ry, atol=TOL[dtype], rtol=TOL[dtype])


def test_rms_norm_3d_and_errors():
    x = torch.randn(2, 3, 32)
    w = torch.rand(32)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.rand(31), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(2, 3, 16), w, 1e-6)


def test_rms_norm_matches_hf_llama():
    """The ref is Hugging Face's LlamaRMSNorm formula: weight * (x * rsqrt(var + eps)).to(dtype)."""
    x = torch.randn(5, 64).bfloat16()
    w = torch.randn(64).bfloat16()
    xf = x.float()
    hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(ref_rms_norm(x, w, 1e-6), hf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,d", [(1, 64), (7, 96), (129, 33)])
def test_silu_and_mul(device, dtype, rows, d):
    x = (torch.randn(rows, 2 * d, generator=torch.Generator().manual_seed(d)) * 4).to(dtype).to(device)
    torch.testing.assert_close(silu_and_mul(x), ref_silu_and_mul(x), atol=TOL[dtype], rtol=TOL[dtype])


def test_silu_and_mul_odd_width():
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(3, 7))
