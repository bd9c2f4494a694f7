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
