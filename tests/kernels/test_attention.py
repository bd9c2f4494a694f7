"""Paged prefill / decode attention: ref_ vs SDPA, Triton kernels vs ref_, quantized-KV quality."""

import pytest
import torch
import torch.nn.functional as F
from kv_helpers import make_batch, rel_err

from anybit.kernels.attention_decode import paged_attention_decode, ref_paged_attention_decode
from anybit.kernels.attention_prefill import paged_attention_prefill, ref_paged_attention_prefill

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# seq_lens / query_lens: full prompts of 1 and 7 tokens, a chunk after a prefix hit ending mid-block
# (70 = 4*16 + 6), and a 20-token chunk at the end of a 129-token context (block boundary + 1).
SEQ_LENS, QUERY_LENS = [7, 70, 129, 1], [7, 33, 20, 1]
DEC_LENS = [1, 16, 17, 129, 300]


def _prefill_args(b, window):
    return (b["query"], b["cache"], b["query_start_loc"], b["seq_lens"], b["block_table"], 0.11, window,
            b["max_query_len"], b["max_seq_len"])


def _decode_args(b, window):
    return (b["query"], b["cache"], b["seq_lens"], b["block_table"], 0.11, window, b["max_seq_len"])


def test_ref_prefill_matches_sdpa():
    """Independent oracle: one full causal prompt, GQA by repeat_interleave, SDPA in float64."""
    b = make_batch([45], [45], 4, 2, 64, "float32", device="cpu")
    out = ref_paged_attention_prefill(*_prefill_args(b, None))
    k = b["keys"][0].repeat_interleave(2, 1).transpose(0, 1).double()
    v = b["values"][0].repeat_interleave(2, 1).transpose(0, 1).double()
    q = b["query"].transpose(0, 1).double()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.11).transpose(0, 1)
    assert rel_err(out, ref) < 1e-6
    # sliding window w: keys at positions p - w < key <= p
    w = 5
    pos = torch.arange(45)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - w)
    ref_w = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.11).transpose(0, 1)
    assert rel_err(ref_paged_attention_prefill(*_prefill_args(b, w)), ref_w) < 1e-6


def test_ref_decode_is_last_prefill_row():
    b = make_batch([37, 90], [1, 1], 4, 1, 64, "bfloat16", device="cpu")
    dec = ref_paged_attention_decode(*_decode_args(b, None))
    pre = ref_paged_attention_prefill(*_prefill_args(b, None))
    torch.testing.assert_close(dec, pre)


CASES = [  # cache dtype, head_dim, num_heads, num_kv_heads, window, query dtype
    ("float32", 64, 4, 4, None, torch.float32),
    ("bfloat16", 128, 4, 1, None, torch.bfloat16),
    ("float32", 64, 4, 1, 20, torch.float32),
    ("int8", 64, 4, 1, None, torch.float32),
    ("int4", 128, 4, 2, 33, torch.float32),
]


def _tol(qdt, device):
    return 1e-5 if qdt == torch.float32 and device == "cpu" else 1.5e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype,head_dim,nh,nkv,window,qdt", CASES)
def test_prefill_kernel(device, cache_dtype, head_dim, nh, nkv, window, qdt):
    b = make_batch(SEQ_LENS, QUERY_LENS, nh, nkv, head_dim, cache_dtype, q_dtype=qdt, device=device)
    ref = ref_paged_attention_prefill(*_prefill_args(b, window))
    kw = dict(block_m=16, block_n=16) if device == "cpu" else {}
    out = paged_attention_prefill(*_prefill_args(b, window), **kw)
    assert out.dtype == qdt and out.shape == b["query"].shape
    assert rel_err(out, ref) < _tol(qdt, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("cache_dtype,head_dim,nh,nkv,window,qdt", CASES)
def test_decode_kernel(device, num_splits, cache_dtype, head_dim, nh, nkv, window, qdt):
    b = make_batch(DEC_LENS, [1] * len(DEC_LENS), nh, nkv, head_dim, cache_dtype, q_dtype=qdt, device=device)
    ref = ref_paged_attention_decode(*_decode_args(b, window))
    out = paged_attention_decode(*_decode_args(b, window), num_splits=num_splits,
                                 block_n=32 if device == "cpu" else None)
    assert out.dtype == qdt
    assert rel_err(out, ref) < _tol(qdt, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", ["int8", "int4", "bfloat16"])
@pytest.mark.parametrize("code_layout,scale_layout", [("token", "token"), ("head", "head")])
def test_other_cache_layouts(device, cache_dtype, code_layout, scale_layout):
    """Caches not in the engine's layouts (head-major codes, packed scales): token-major codes and
    scales (the layout before session 14), per-array head-major scales; the write, prefill and decode
    kernels follow the strides."""
    kw = dict(device=device, code_layout=code_layout, scale_layout=scale_layout)
    b = make_batch(SEQ_LENS, QUERY_LENS, 4, 2, 64, cache_dtype, **kw)
    assert b["cache"].key.is_contiguous() == (code_layout == "token")
    tol = _tol(torch.float32, device)
    bkw = dict(block_m=16, block_n=16) if device == "cpu" else {}
    pre = paged_attention_prefill(*_prefill_args(b, None), **bkw)
    assert rel_err(pre, ref_paged_attention_prefill(*_prefill_args(b, None))) < tol
    d = make_batch(DEC_LENS, [1] * len(DEC_LENS), 4, 2, 64, cache_dtype, **kw)
    out = paged_attention_decode(*_decode_args(d, None), num_splits=3,
                                 block_n=32 if device == "cpu" else None)
    assert rel_err(out, ref_paged_attention_decode(*_decode_args(d, None))) < tol


def test_decode_context_longer_than_max_seq_len_stays_correct():
    """A stale (CUDA-graph) max_seq_len only sizes the splits; the last split runs to seq_len."""
    b = make_batch([130, 61], [1, 1], 4, 2, 64, "float32", device="cpu")
    ref = ref_paged_attention_decode(*_decode_args(b, None))
    args = list(_decode_args(b, None))
    args[-1] = 40
    out = paged_attention_decode(*args, num_splits=2, block_n=16)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge_max,dyn", [(0, False), (2, False), (8, False), (0, True), (2, True)])
@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_decode_graph_sized_splits_merge_in_kernel(device, merge_max, dyn, cache_dtype):
    """A CUDA graph sizes the splits for max_model_len (here 16 splits of 128 tokens for 2048): the
    splits past each context write nothing (1, 16, 17 tokens: 1 split; 129: 2; 300: 3), the decode
    kernel's last split merges merge_max partials at a time (2: two rounds for 300 tokens) or the
    reduction kernel does (0); a second call gives the same bits (counters reset). ``dyn_split``:
    every context spread over the splits in 32-token blocks instead (129: 5 splits, 300: 10)."""
    b = make_batch(DEC_LENS, [1] * len(DEC_LENS), 8, 2, 64, cache_dtype, device=device)
    args = list(_decode_args(b, None))
    ref = ref_paged_attention_decode(*args)
    args[-1] = 2048
    kw = dict(num_splits=16, block_n=32, merge_max=merge_max, dyn_split=dyn)
    out = paged_attention_decode(*args, **kw)
    assert rel_err(out, ref) < _tol(torch.float32, device)
    assert torch.equal(out, paged_attention_decode(*args, **kw))
    with pytest.raises(ValueError, match="merge_max"):
        paged_attention_decode(*args, num_splits=16, merge_max=3)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_kv_quality(device):
    """int8 / int4 caches vs the bf16 cache on the same random K/V (Gaussian data, 300 tokens)."""
    outs = {}
    for dt in ("bfloat16", "int8", "int4"):
        b = make_batch([300, 77], [1, 1], 4, 1, 64, dt, q_dtype=torch.float32, seed=7, device=device)
        outs[dt] = paged_attention_decode(*_decode_args(b, None), num_splits=2,
                                          block_n=64 if device == "cpu" else None)
    assert rel_err(outs["int8"], outs["bfloat16"]) < 0.02
    assert rel_err(outs["int4"], outs["bfloat16"]) < 0.2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flags", [{"int8_qk": True}, {"int8_qk": True, "int8_pv": True}])
def test_decode_int8_mma_variants(device, flags):
    """Opt-in int8 tensor-core paths: extra error small next to the int8 cache's own error."""
    b = make_batch([300, 77, 1], [1, 1, 1], 4, 1, 64, "int8", q_dtype=torch.float32, seed=5, device=device)
    ref = ref_paged_attention_decode(*_decode_args(b, None))
    out = paged_attention_decode(*_decode_args(b, None), num_splits=2,
                                 block_n=64 if device == "cpu" else None, **flags)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype,head_dim,nkv,window", [("int8", 64, 1, None), ("int4", 128, 2, 33)])
def test_decode_biased_codes(device, cache_dtype, head_dim, nkv, window):
    """Quantized fast path: biased fp16 codes (packed PTX conversion on the GPU), bias and scales
    folded into scores / probabilities. float32 query on CPU (bias cancellation ~1e-5), bf16 on GPU."""
    qdt = torch.float32 if device == "cpu" else torch.bfloat16
    b = make_batch(DEC_LENS, [1] * len(DEC_LENS), 4, nkv, head_dim, cache_dtype, q_dtype=qdt, device=device)
    ref = ref_paged_attention_decode(*_decode_args(b, window))
    for splits in ((3,) if device == "cpu" else (1, 3)):
        out = paged_attention_decode(*_decode_args(b, window), num_splits=splits, biased=True,
                                     block_n=32 if device == "cpu" else None)
        assert rel_err(out, ref) < (2e-4 if device == "cpu" else 1.5e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads_first", [False, True])
def test_decode_grid_order(device, heads_first):
    """Grid (kv heads, seqs, splits) or (seqs, kv heads, splits): same result, GQA with 2 kv heads."""
    b = make_batch(DEC_LENS, [1] * len(DEC_LENS), 4, 2, 64, "float32", device=device)
    ref = ref_paged_attention_decode(*_decode_args(b, None))
    out = paged_attention_decode(*_decode_args(b, None), num_splits=3, heads_first=heads_first,
                                 block_n=32 if device == "cpu" else None)
    assert rel_err(out, ref) < _tol(torch.float32, device)


def test_choose_splits_fills_whole_waves():
    from anybit.kernels.attention_decode import choose_splits

    assert choose_splits(8, 4096, 396) == 32           # one wave even at the most splits: use them all
    assert choose_splits(256, 8192, 396) == 3          # 768 programs = 1.94 waves of 396
    assert choose_splits(512, 8192, 396) == 3          # not 2: 1024 programs = 2.59 waves
    assert choose_splits(256, 8192, 528) == 2          # 512 = 0.97 of a wave
    assert choose_splits(1, 100, 396) == 1             # at least 128 tokens per split
