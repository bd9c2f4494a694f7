"""Dense fp16/bf16 GEMV (M = 1..4): Triton kernel vs ref_gemv_bf16 (interpreter on CPU), and the
UnquantizedMethod dispatch."""

import pytest
import torch

from anybit.kernels.gemv_bf16 import gemv_bf16, ref_gemv_bf16
from anybit.layers import linear as linear_mod
from anybit.layers.linear import Linear

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _data(M, N, K, dtype, device, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
    return x, w, b


def _check(y, x, w, b):
    ref = ref_gemv_bf16(x, w, b)
    assert y.dtype == x.dtype and y.shape == ref.shape
    # bf16 output: one rounding step (the interpreter truncates fp32 -> bf16); fp16: finer
    tol = 2e-2 if x.dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,bias,split_k", [
    (1, 40, 264, True, 1),     # N, K not multiples of the blocks; one split
    (1, 40, 264, False, 3),    # split-K over a ragged K (last split partial)
    (3, 37 + 3, 1000, True, None),  # M = 3, launcher's split choice
    (1, 64, 512, True, 4),     # even K and N (no masks)
])
def test_gemv_bf16(device, dtype, M, N, K, bias, split_k):
    x, w, b = _data(M, N, K, dtype, device, seed=M * N + K, bias=bias)
    y = gemv_bf16(x, w, b, block_n=16, block_k=64, num_warps=2, split_k=split_k)
    _check(y, x, w, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_bf16_repeated_split_k(device):
    """The split-K counters reset themselves: repeated calls (other data, other M) stay correct."""
    for i, M in enumerate((1, 2, 1)):
        x, w, b = _data(M, 24, 136, torch.bfloat16, device, seed=7 + i)
        y = gemv_bf16(x, w, b, block_n=8, block_k=32, num_warps=1, split_k=3)
        _check(y, x, w, b)
    from anybit.kernels.quant_gemv_h2 import split_k_counters
    assert int(split_k_counters(x.device, 16)[:16].abs().sum()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_bf16_m4_default_config(device):
    """M = 4 (the largest) with the launcher's default tile, and a strided x row."""
    x, w, b = _data(4, 24, 2 * 256 + 8, torch.float16, device, seed=3)
    _check(gemv_bf16(x, w, b), x, w, b)
    xs = torch.randn(2, 2 * w.shape[1]).to(torch.float16).to(device)[:, : w.shape[1]]  # row stride 2K
    _check(gemv_bf16(xs, w, None), xs, w, None)


def test_gemv_bf16_rejects_bad_input():
    x, w, b = _data(5, 16, 64, torch.bfloat16, "cpu", seed=1)
    with pytest.raises(ValueError, match="M must be"):
        gemv_bf16(x, w, b)
    with pytest.raises(ValueError, match="one dtype"):
        gemv_bf16(x[:1].half(), w, b)
    with pytest.raises(ValueError, match="contiguous along K"):
        gemv_bf16(x[:1], w.t().contiguous().t(), b)


def test_unquantized_apply_cpu_keeps_f_linear(monkeypatch):
    """On CPU (and under the interpreter) apply is F.linear, also for one token; the switch exists."""
    assert isinstance(linear_mod.BF16_GEMV, bool)
    lin = Linear(64, [16, 8], ["a", "b"], bias=True, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lin.weight.data.copy_(torch.randn(24, 64, generator=g))
    lin.bias.data.copy_(torch.randn(24, generator=g))
    for shape in ((64,), (1, 64), (1, 1, 64), (3, 64)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        y = lin(x)
        assert y.shape == (*shape[:-1], 24)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096,), (1, 4096), (1, 1, 4096), (2, 4096)])
def test_unquantized_apply_cuda_gemv(monkeypatch, shape):
    """CUDA, one token: the GEMV (bias included) matches F.linear; more tokens or the switch off:
    F.linear itself."""
    lin = Linear(4096, [1024, 512], ["a", "b"], bias=True, dtype=torch.bfloat16).cuda()
    lin.weight.data.normal_(0, 0.02)
    lin.bias.data.normal_()
    x = torch.randn(*shape, device="cuda").to(torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    y = lin(x)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    monkeypatch.setattr(linear_mod, "BF16_GEMV", False)
    torch.testing.assert_close(lin(x).float(), ref, atol=2e-2, rtol=2e-2)
