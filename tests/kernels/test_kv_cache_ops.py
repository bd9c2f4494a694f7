"""reshape_and_cache (float and quantize-on-write int8/int4) vs ref_, and the quantizer's accuracy."""

import pytest
import torch
from kv_helpers import CACHE_TENSORS, make_cache

from anybit.kernels.kv_cache_ops import (
    gather_kv,
    ref_dequantize_kv,
    ref_quantize_kv,
    ref_reshape_and_cache,
    reshape_and_cache,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantize_roundtrip_error_bound(dtype):
    x = torch.randn(50, 4, 64) * torch.rand(50, 4, 1) * 5
    q, s, z = ref_quantize_kv(x, dtype)
    y = ref_dequantize_kv(q, s, z, dtype)
    step = s.unsqueeze(-1)
    assert ((y - x).abs() <= step * 0.5 + 1e-5).all()
    if dtype == "int4":
        assert q.dtype == torch.uint8 and q.shape == (50, 4, 32)
        # element 2i in the low nibble, 2i+1 in the high nibble
        codes = torch.round((x - z.unsqueeze(-1)) / step)
        assert torch.equal((q & 15).float(), codes[..., 0::2])
        assert torch.equal((q >> 4).float(), codes[..., 1::2])
    else:
        assert q.dtype == torch.int8 and q.abs().max() == 127


def test_quantize_constant_row_is_finite():
    x = torch.full((3, 2, 16), 0.5)
    for dtype in ("int8", "int4"):
        q, s, z = ref_quantize_kv(x, dtype)
        assert torch.isfinite(ref_dequantize_kv(q, s, z, dtype)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("head_dim,num_tokens", [(64, 7), (128, 33)])
def test_reshape_and_cache(device, dtype, head_dim, num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    nkv, bs, nb = 2, 16, 6
    key = (torch.randn(num_tokens, nkv, head_dim, generator=g) * 2).to(device)
    value = torch.randn(num_tokens, nkv, head_dim, generator=g).to(device)
    if dtype == "bfloat16":  # the model's dtype (the interpreter truncates fp32 -> bf16)
        key, value = key.bfloat16(), value.bfloat16()
    slots = torch.randperm(nb * bs, generator=g)[:num_tokens]
    slots[3] = -1  # padding: must not be written
    slots = slots.to(device)
    c_ref = make_cache(dtype, nb, bs, nkv, head_dim, device)
    c_tri = make_cache(dtype, nb, bs, nkv, head_dim, device)
    for name in CACHE_TENSORS:
        if getattr(c_ref, name) is not None:
            getattr(c_tri, name).copy_(getattr(c_ref, name))
    ref_reshape_and_cache(key, value, c_ref, slots)
    reshape_and_cache(key, value, c_tri, slots)
    if dtype in ("float32", "bfloat16"):
        assert torch.equal(c_tri.key, c_ref.key) and torch.equal(c_tri.value, c_ref.value)
        return
    torch.testing.assert_close(c_tri.key_scale, c_ref.key_scale, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_tri.value_scale, c_ref.value_scale, rtol=1e-6, atol=1e-7)
    # codes may differ by one step at exact rounding ties (GPU division is not IEEE): compare values
    table = torch.arange(nb, device=device, dtype=torch.int32)
    kr, vr = gather_kv(c_ref, table, nb * bs)
    kt, vt = gather_kv(c_tri, table, nb * bs)
    step = c_ref.key_scale.flatten(0, 1).max().item()
    assert (kt - kr).abs().max().item() <= step * 1.01
    assert (vt - vr).abs().max().item() <= c_ref.value_scale.max().item() * 1.01
    mismatch = (kt != kr).float().mean().item()
    assert mismatch < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_and_cache_strided_input(device):
    """key/value as views into a fused qkv buffer (token stride > heads * head_dim)."""
    qkv = torch.randn(5, 6, 32, device=device)
    key, value = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.tensor([0, 17, 5, 40, 33], device=device)
    c_ref, c_tri = make_cache("float32", 4, 16, 2, 32, device), make_cache("float32", 4, 16, 2, 32, device)
    c_tri.key.copy_(c_ref.key)
    c_tri.value.copy_(c_ref.value)
    ref_reshape_and_cache(key, value, c_ref, slots)
    reshape_and_cache(key, value, c_tri, slots)
    assert torch.equal(c_tri.key, c_ref.key) and torch.equal(c_tri.value, c_ref.value)


def test_reshape_and_cache_errors():
    c = make_cache("int4", 2, 16, 2, 32, "cpu")
    with pytest.raises(ValueError, match="kv_cache.key"):
        ref_reshape_and_cache(torch.randn(3, 2, 64), torch.randn(3, 2, 64), c, torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        ref_reshape_and_cache(torch.randn(3, 2, 32), torch.randn(3, 2, 32), c, torch.arange(2))
