"""Quantized decode variants (register prefetch of the K/V code tiles) vs ``ref_``: odd context
lengths, tile and page boundaries, GQA, int8/int4, sliding window, split counts, stale max_seq_len."""

import pytest
import torch
from kv_helpers import make_batch, rel_err

from anybit.kernels.attention_decode import blocks_per_sm, paged_attention_decode, ref_paged_attention_decode

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# 1 token, one page minus/plus one, exactly one 32-token tile, tile boundary + 1, several tiles
LENS = [1, 15, 17, 32, 33, 129, 250]


def _args(b, window):
    return (b["query"], b["cache"], b["seq_lens"], b["block_table"], 0.11, window, b["max_seq_len"])


def _tol(device):
    # float32 query on CPU: only the bias cancellation (~1e-5 int8, ~5e-5 int4); bf16 on the GPU
    return 2e-4 if device == "cpu" else 1.5e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("cache_dtype,head_dim,nh,nkv,window,splits", [
    ("int8", 64, 8, 2, None, 1),
    ("int8", 128, 4, 1, 40, 3),
    ("int4", 64, 4, 1, None, 3),
    ("int4", 128, 8, 2, 33, 1),
])
def test_decode_prefetch(device, prefetch, cache_dtype, head_dim, nh, nkv, window, splits):
    qdt = torch.float32 if device == "cpu" else torch.bfloat16
    b = make_batch(LENS, [1] * len(LENS), nh, nkv, head_dim, cache_dtype, q_dtype=qdt, device=device)
    ref = ref_paged_attention_decode(*_args(b, window))
    out = paged_attention_decode(*_args(b, window), num_splits=splits, biased=True, prefetch=prefetch,
                                 block_n=32 if device == "cpu" else None)
    assert out.dtype == qdt
    assert rel_err(out, ref) < _tol(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", ["int8", "int4"])
def test_decode_prefetch_matches_default_path(device, cache_dtype):
    """Same math as the non-prefetch biased path: results agree to float rounding."""
    qdt = torch.float32 if device == "cpu" else torch.bfloat16
    b = make_batch([70, 300], [1, 1], 4, 1, 64, cache_dtype, q_dtype=qdt, seed=3, device=device)
    kw = dict(num_splits=2, biased=True, block_n=16 if device == "cpu" else None)
    base = paged_attention_decode(*_args(b, None), prefetch=0, **kw)
    for pf in (1, 2):
        assert rel_err(paged_attention_decode(*_args(b, None), prefetch=pf, **kw), base) < (
            1e-5 if device == "cpu" else 1e-2)


def test_decode_prefetch_stale_max_seq_len():
    """CUDA-graph sizing: the last split runs past max_seq_len; the prefetch chain must follow it."""
    b = make_batch([130, 61], [1, 1], 4, 2, 64, "int8", device="cpu")
    ref = ref_paged_attention_decode(*_args(b, None))
    args = list(_args(b, None))
    args[-1] = 40
    out = paged_attention_decode(*args, num_splits=2, block_n=16, biased=True, prefetch=1)
    assert rel_err(out, ref) < 2e-4


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", ["int8", "int4"])
@pytest.mark.parametrize("cfg", [dict(prefetch=0, num_stages=1, max_registers=128),
                                 dict(prefetch=1, max_registers=0), dict(prefetch=2, max_registers=0),
                                 dict(prefetch=1), dict(prefetch=2)])
def test_decode_register_caps_gpu(cache_dtype, cfg):
    """Register-capped / prefetch configs compile and stay correct on the GPU (spills are legal)."""
    b = make_batch(LENS + [1000], [1] * (len(LENS) + 1), 8, 2, 128, cache_dtype, q_dtype=torch.bfloat16,
                   device="cuda")
    ref = ref_paged_attention_decode(*_args(b, None))
    for splits in (None, 1, 3):
        out = paged_attention_decode(*_args(b, None), num_splits=splits, **cfg)
        assert rel_err(out, ref) < 1.5e-2


def test_blocks_per_sm_prefetch():
    assert blocks_per_sm(1, 128, 4, 1, None, prefetch=1) == 2   # 204-226 registers
    assert blocks_per_sm(1, 128, 4, 1, 168, prefetch=1) == 3
    assert blocks_per_sm(2, 128, 4, 1, 128, prefetch=2) == 4
    assert blocks_per_sm(1, 128, 4, 3, None) == 3
