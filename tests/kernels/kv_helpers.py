"""Shared builders for the attention / KV-cache kernel tests: caches, block tables, batches."""

from __future__ import annotations

import torch

from anybit.kernels.kv_cache_ops import ref_reshape_and_cache
from anybit.layers.attention_meta import LayerKVCache, new_layer_kv_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_cache(dtype: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               device=DEVICE, scale_layout: str = "packed", code_layout: str = "head") -> LayerKVCache:
    """An empty cache filled with random garbage (never zeros), so unwritten reads show up.

    Layouts: ``kv_code_buffer`` / ``kv_scale_buffers`` ones (defaults: the engine's)."""
    c = new_layer_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, code_layout,
                           scale_layout)
    for t in (c.key, c.value):
        if dtype == "int8":
            t.copy_(torch.randint(-127, 128, t.shape, dtype=torch.int8))
        elif dtype == "int4":
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8))
        else:
            t.normal_()
    for i, t in enumerate((c.key_scale, c.value_scale, c.key_zero, c.value_zero)):
        if t is not None:  # scales in [0, 1), zero points normal
            t.uniform_() if i < 2 else t.normal_()
    return c


def make_batch(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
               cache_dtype: str, block_size: int = 16, q_dtype=torch.float32, seed: int = 0, device=DEVICE,
               scale_layout: str = "packed", code_layout: str = "head"):
    """Random context K/V written into a paged cache through shuffled block tables.

    Returns dict with query [sum(query_lens), num_heads, head_dim], cache, query_start_loc,
    seq_lens, block_table (pages shuffled, unused entries random), host lists, and the float K/V.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    nbs = [(s + block_size - 1) // block_size for s in seq_lens]
    max_blocks = max(nbs) + 1
    num_blocks = sum(nbs) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=g, dtype=torch.int32)
    cache = make_cache(cache_dtype, num_blocks, block_size, num_kv_heads, head_dim, device, scale_layout,
                       code_layout)
    used = 0
    ks, vs = [], []
    for i, (s, nb) in enumerate(zip(seq_lens, nbs)):
        table[i, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
        k = torch.randn(s, num_kv_heads, head_dim, generator=g).to(q_dtype)
        v = torch.randn(s, num_kv_heads, head_dim, generator=g).to(q_dtype)
        pos = torch.arange(s)
        slots = table[i, pos // block_size].long() * block_size + pos % block_size
        ref_reshape_and_cache(k.to(device), v.to(device), cache, slots.to(device))
        ks.append(k)
        vs.append(v)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(q_dtype)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    return dict(query=query.to(device), cache=cache, query_start_loc=qsl.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                block_table=table.to(device), query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
                max_query_len=max(query_lens), max_seq_len=max(seq_lens), keys=ks, values=vs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


CACHE_TENSORS = ("key", "value", "key_scale", "value_scale", "key_zero", "value_zero")


def assert_same_cache(a: LayerKVCache, b: LayerKVCache) -> None:
    """Every tensor of two caches (codes, scales, zero points) equal bit for bit, or absent in both."""
    for name in CACHE_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
