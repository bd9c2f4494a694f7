"""TritonAttentionBackend vs the reference computation on a mixed step (decodes first, then a
prefill chunk after a prefix hit and a fresh prompt), through the Triton interpreter on CPU."""

from types import SimpleNamespace

import pytest
import torch
from kv_helpers import DEVICE, make_batch, rel_err

from anybit.kernels.attention_decode import ref_paged_attention_decode
from anybit.kernels.attention_prefill import ref_paged_attention_prefill
from anybit.kernels.kv_cache_ops import ref_reshape_and_cache
from anybit.kernels.rope import ref_rotary_embedding
from anybit.layers.attention_meta import AttentionMetadata, LayerKVCache
from anybit.layers.attention_triton import TritonAttentionBackend


def _clone(c: LayerKVCache) -> LayerKVCache:
    f = lambda t: None if t is None else t.clone()
    return LayerKVCache(f(c.key), f(c.value), c.dtype, f(c.key_scale), f(c.value_scale), f(c.key_zero),
                        f(c.value_zero))


@pytest.mark.parametrize("cache_dtype", ["float32", pytest.param("int8", marks=pytest.mark.gpu)])
def test_triton_backend_mixed_step(cache_dtype):
    nh, nkv, hd, bs = 4, 2, 64, 16
    seq_lens, query_lens = [20, 33, 50, 9], [1, 1, 18, 9]   # 2 decodes, chunk after a prefix hit, prompt
    b = make_batch(seq_lens, query_lens, nh, nkv, hd, cache_dtype)
    dev = b["query"].device
    g = torch.Generator().manual_seed(3)
    t = sum(query_lens)
    # the step's q/k/v projections (before rotary), as views of one fused buffer
    qkv = torch.randn(t, (nh + 2 * nkv) * hd, generator=g).to(dev)
    query, key, value = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=1)
    positions = torch.cat([torch.arange(s - q, s) for s, q in zip(seq_lens, query_lens)]).to(dev)
    table = b["block_table"]
    slots = torch.cat([table[i, p // bs].long() * bs + p % bs
                       for i, p in enumerate(positions.split(query_lens))])
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    f = torch.outer(torch.arange(64).float(), inv)
    rotary = SimpleNamespace(cos_sin_cache=torch.cat([f.cos(), f.sin()], -1).to(dev), is_neox=True)
    layer = SimpleNamespace(num_heads=nh, num_kv_heads=nkv, head_dim=hd, scale=hd ** -0.5,
                            sliding_window=None, rotary=rotary)
    meta = AttentionMetadata(num_seqs=4, num_decodes=2, query_start_loc=b["query_start_loc"],
                             seq_lens=b["seq_lens"], block_table=table, slot_mapping=slots,
                             max_query_len=18, max_seq_len=50, query_lens_cpu=query_lens,
                             seq_lens_cpu=seq_lens)
    ref_cache = _clone(b["cache"])
    # reference: rope, write, decode rows then prefill rows
    q3, k3 = ref_rotary_embedding(positions, query.reshape(t, nh, hd), key.reshape(t, nkv, hd),
                                  layer.rotary.cos_sin_cache)
    ref_reshape_and_cache(k3, value.reshape(t, nkv, hd), ref_cache, slots)
    ref = torch.cat([
        ref_paged_attention_decode(q3[:2], ref_cache, meta.seq_lens[:2], table[:2], layer.scale, None, 50),
        ref_paged_attention_prefill(q3[2:], ref_cache, meta.query_start_loc[2:] - 2, meta.seq_lens[2:],
                                    table[2:], layer.scale, None, 18, 50)])
    out = TritonAttentionBackend().forward(layer, query, key, value, positions, b["cache"], meta)
    assert out.shape == (t, nh * hd)
    assert rel_err(out.view(t, nh, hd), ref) < (1e-5 if DEVICE == "cpu" else 1e-2)
    if cache_dtype == "float32":
        assert torch.equal(b["cache"].key, ref_cache.key)
