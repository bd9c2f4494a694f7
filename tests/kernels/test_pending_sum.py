"""PendingSum (anybit/layers/pending.py): the GEMV adds into a float32 accumulator, the consumer
kernels (RMSNorm, SiLU-and-mul, rotary + KV write) read it, round it where the GEMV would have,
and zero it. Each consumer must give the bits it gives on the rounded tensor (interpreter on CPU;
there the accumulator holds bf16-exact values, since the interpreter truncates float32 -> bf16
while torch rounds), and leave the accumulator zero."""

import pytest
import torch

from anybit.kernels.activation import silu_and_mul
from anybit.kernels.rms_norm import fused_add_rms_norm, rms_norm
from anybit.layers.pending import PendingSum, as_tensor, new_pending

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DT = torch.bfloat16


def _filled(rows, cols, device, seed, scale=3.0) -> PendingSum:
    """A PendingSum whose accumulator holds random values (bf16-exact on CPU)."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.randn(rows, cols, generator=g) * scale
    if device == "cpu":
        vals = vals.to(DT).float()
    p = new_pending(rows, cols, DT, (rows, cols), torch.device(device))
    p.acc.copy_(vals.to(device))
    return p


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_reads_and_zeroes_the_accumulator(device):
    w = (1 + torch.randn(200) * 0.1).to(DT).to(device)
    r = torch.randn(1, 200).to(DT).to(device)
    p = _filled(1, 200, device, 1)
    x = p.acc.to(DT)
    y, nr = fused_add_rms_norm(p, r, w, 1e-5)
    ry, rr = fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(y, ry) and torch.equal(nr, rr)
    assert not p.acc.any()
    p = _filled(1, 200, device, 2)
    x = p.acc.to(DT)
    assert torch.equal(rms_norm(p, w, 1e-6), rms_norm(x, w, 1e-6))
    assert not p.acc.any()


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_reads_and_zeroes_the_accumulator(device):
    p = _filled(1, 2 * 300, device, 3)
    x = p.acc.to(DT)
    assert torch.equal(silu_and_mul(p), silu_and_mul(x))
    assert not p.acc.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8", "int4"])
def test_rotary_and_cache_reads_the_qkv_accumulator(device, cache_dtype):
    """Same q, k, v outputs and cache contents as from the rounded QKV tensor; acc zeroed."""
    from kv_helpers import assert_same_cache, make_cache
    from test_rope import _cos_sin

    from anybit.kernels.rope import rotary_and_cache

    nh, nkv, hd = 4, 2, 64
    sizes = [nh * hd, nkv * hd, nkv * hd]
    p = _filled(1, sum(sizes), device, 4)
    qkv = p.acc.to(DT)
    pos = torch.tensor([37], device=device)
    slots = torch.tensor([21], device=device)
    cs = _cos_sin(300, hd).to(device)
    caches, outs = [], []
    for use_acc in (True, False):
        torch.manual_seed(0)
        cache = make_cache(cache_dtype, 3, 16, nkv, hd, device=device)
        buf = torch.full_like(qkv, float("nan")) if use_acc else qkv.clone()
        q, k, v = (t.view(1, -1, hd) for t in buf.split(sizes, dim=1))
        acc = tuple(t.view(1, -1, hd) for t in p.acc.split(sizes, dim=1)) if use_acc else None
        rotary_and_cache(pos, q, k, v, cs, True, cache, slots, acc=acc)
        caches.append(cache)
        outs.append(buf)
    assert torch.equal(outs[0], outs[1])
    assert_same_cache(caches[0], caches[1])
    assert not p.acc.any()


def test_rotary_and_cache_rejects_a_partial_rotary_with_acc():
    from kv_helpers import make_cache
    from test_rope import _cos_sin

    from anybit.kernels.rope import rotary_and_cache

    p = _filled(1, 4 * 64, "cpu", 5)
    q, k, v = (t.view(1, -1, 64) for t in torch.empty(1, 4 * 64, dtype=DT).split([128, 64, 64], dim=1))
    acc = tuple(t.view(1, -1, 64) for t in p.acc.split([128, 64, 64], dim=1))
    with pytest.raises(ValueError, match="acc"):
        cache = make_cache("bfloat16", 2, 16, 1, 64, device="cpu")
        rotary_and_cache(torch.tensor([1]), q, k, v, _cos_sin(8, 32), True, cache, torch.tensor([0]), acc=acc)


def test_unconsumed_sum_is_cleared_and_materialize():
    p = new_pending(2, 8, DT, (2, 8), torch.device("cpu"))
    p.acc.fill_(1.5)
    q = new_pending(2, 8, DT, (2, 8), torch.device("cpu"))  # p was never consumed: zeroed
    assert q.acc is p.acc and not q.acc.any()
    q.acc.fill_(2.0)
    y = as_tensor(q)
    assert y.dtype == DT and y.shape == (2, 8) and bool((y == 2.0).all()) and not q.acc.any()
    r = new_pending(2, 8, DT, (2, 8), torch.device("cpu"))
    r.acc.fill_(3.0)
    r.consumed()
    s = new_pending(2, 8, DT, (2, 8), torch.device("cpu"))  # consumed: the consumer zeroes, not us
    assert bool((s.acc == 3.0).all())
    s.materialize()


def test_linear_returns_a_tensor_on_cpu_even_when_pending_is_asked():
    from anybit.layers.linear import Linear

    lin = Linear(16, [8], dtype=torch.float32)
    lin.weight.data.copy_(torch.randn(8, 16))
    y = lin(torch.randn(1, 16), pending=True)
    assert isinstance(y, torch.Tensor)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 3, 8, 16])
def test_mma_kernel_adds_its_partials_into_the_accumulator(M):
    """quant_gemv_mma(acc=...) (batches 2..16): the split partials land in acc (a column slice of a
    wider accumulator); rounded, within one bf16 step of the ordered split-K result."""
    from anybit.kernels.quant_gemv_mma import quant_gemv_mma
    from anybit.quant.rtn import QuantSpec, rtn_quantize

    g = torch.Generator().manual_seed(M)
    pw = rtn_quantize(torch.randn(256, 1024, generator=g), QuantSpec(4, 128, "uniform")).to("cuda")
    x = torch.randn(M, 1024, generator=g).to(DT).cuda()
    wide = new_pending(M, 384, DT, (M, 384), torch.device("cuda"))
    out = quant_gemv_mma(x, pw, None, acc=wide.acc[:, 64:320], split_k=4)
    assert out.data_ptr() == wide.acc[:, 64:320].data_ptr()
    assert not wide.acc[:, :64].any() and not wide.acc[:, 320:].any()
    y = quant_gemv_mma(x, pw, torch.empty(M, 256, dtype=DT, device="cuda"), split_k=4)
    step = y.float().abs() * 2 ** -7 + 1e-6
    assert ((wide.acc[:, 64:320].to(DT).float() - y.float()).abs() <= step).all()
    wide.materialize()
