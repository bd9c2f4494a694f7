"""Rotary embedding: Triton kernel (in place, strided views) vs ref_, and ref_ vs HF rotate_half."""

import pytest
import torch

from anybit.kernels.rope import ref_rotary_embedding, rotary_embedding

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _cos_sin(max_pos: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    inv = 1.0 / base ** (torch.arange(0, rot, 2).float() / rot)
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([f.cos(), f.sin()], -1)


def test_ref_matches_hf_rotate_half():
    q, k = torch.randn(7, 4, 64), torch.randn(7, 2, 64)
    pos = torch.tensor([0, 3, 5, 9, 2, 100, 17])
    cs = _cos_sin(128, 64)
    cos = torch.cat([cs[pos, :32]] * 2, -1)[:, None]
    sin = torch.cat([cs[pos, 32:]] * 2, -1)[:, None]

    def rotate_half(x):
        return torch.cat((-x[..., 32:], x[..., :32]), -1)

    rq, rk = ref_rotary_embedding(pos, q, k, cs, True)
    torch.testing.assert_close(rq, q * cos + rotate_half(q) * sin)
    torch.testing.assert_close(rk, k * cos + rotate_half(k) * sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens,head_dim,rot", [(1, 64, 64), (7, 128, 128), (129, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel(device, is_neox, tokens, head_dim, rot, dtype):
    g = torch.Generator().manual_seed(tokens + head_dim)
    nh, nkv = 4, 2
    # q and k are strided views into one fused qkv buffer, as the attention layer passes them
    qkv = torch.randn(tokens, (nh + 2 * nkv) * head_dim, generator=g).to(dtype).to(device)
    q = qkv[:, : nh * head_dim].view(tokens, nh, head_dim)
    k = qkv[:, nh * head_dim:(nh + nkv) * head_dim].view(tokens, nkv, head_dim)
    pos = torch.randint(0, 300, (tokens,), generator=g).to(device)
    cs = _cos_sin(300, rot).to(device)
    rq, rk = ref_rotary_embedding(pos, q, k, cs, is_neox)
    v_before = qkv[:, (nh + nkv) * head_dim:].clone()
    oq, ok = rotary_embedding(pos, q, k, cs, is_neox)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(oq, rq, atol=tol, rtol=tol)
    torch.testing.assert_close(ok, rk, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (nh + nkv) * head_dim:], v_before)


def test_rotary_errors():
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="positions"):
        ref_rotary_embedding(torch.arange(2), q, k, _cos_sin(8, 64))
    with pytest.raises(ValueError, match="rotary_dim"):
        ref_rotary_embedding(torch.arange(3), q, k, _cos_sin(8, 128))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype,dtype,is_neox", [("bfloat16", torch.bfloat16, True),
                                                       ("int8", torch.bfloat16, False),
                                                       ("int4", torch.float32, True)])
def test_rotary_and_cache_matches_two_launches(device, cache_dtype, dtype, is_neox):
    """Fused rope + cache write == rotary_embedding then reshape_and_cache, bit for bit (padding slot -1)."""
    from kv_helpers import assert_same_cache, make_cache

    from anybit.kernels.kv_cache_ops import reshape_and_cache
    from anybit.kernels.rope import ref_rotary_and_cache, rotary_and_cache

    g = torch.Generator().manual_seed(11)
    tokens, nh, nkv, hd = 9, 4, 2, 64
    qkv = torch.randn(tokens, (nh + 2 * nkv) * hd, generator=g).to(dtype).to(device)
    pos = torch.randint(0, 300, (tokens,), generator=g).to(device)
    slots = torch.randperm(5 * 16, generator=g)[:tokens].to(device)
    slots[3] = -1
    cs = _cos_sin(300, hd).to(device)
    caches, outs = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        cache = make_cache(cache_dtype, 5, 16, nkv, hd, device=device)
        buf = qkv.clone()
        q, k, v = (t.view(tokens, -1, hd) for t in buf.split([nh * hd, nkv * hd, nkv * hd], dim=1))
        if fused:
            rotary_and_cache(pos, q, k, v, cs, is_neox, cache, slots)
        else:
            rotary_embedding(pos, q, k, cs, is_neox)
            reshape_and_cache(k, v, cache, slots)
        caches.append(cache)
        outs.append(buf)
    assert torch.equal(outs[0], outs[1])
    assert_same_cache(caches[0], caches[1])
    # and against the torch reference (query and key rotation)
    q0 = qkv[:, :nh * hd].view(tokens, nh, hd)
    k0 = qkv[:, nh * hd:(nh + nkv) * hd].view(tokens, nkv, hd)
    v0 = qkv[:, (nh + nkv) * hd:].view(tokens, nkv, hd)
    ref_cache = make_cache(cache_dtype, 5, 16, nkv, hd, device=device)
    rq, rk = ref_rotary_and_cache(pos, q0, k0, v0, cs, is_neox, ref_cache, slots)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0][:, :nh * hd].view(tokens, nh, hd), rq, atol=tol, rtol=tol)
