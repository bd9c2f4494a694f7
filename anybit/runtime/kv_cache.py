"""Size the paged KV cache from a memory budget and allocate it.

In: the model's ArchConfig, the CacheConfig and the device. Out: ``num_blocks`` and one
``LayerKVCache`` per layer (layout in docs/interfaces.md). Called by ModelRunner at start-up.
"""

from __future__ import annotations

import torch

from anybit.config import CacheConfig
from anybit.layers import attention_meta
from anybit.layers.attention_meta import FLOAT_KV_DTYPES, LayerKVCache, new_layer_kv_cache
from anybit.models.arch import ArchConfig


def resolve_kv_dtype(cache: CacheConfig, model_dtype: torch.dtype) -> str:
    if cache.kv_cache_dtype != "auto":
        return cache.kv_cache_dtype
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[model_dtype]


def bytes_per_block(arch: ArchConfig, block_size: int, kv_dtype: str) -> int:
    """Bytes of K and V (and their scales) for one block across all layers."""
    elems = block_size * arch.num_kv_heads * arch.head_dim
    scale_bytes = attention_meta.KV_SCALE_DTYPE.itemsize
    if kv_dtype in FLOAT_KV_DTYPES:
        per_tensor = elems * torch.tensor([], dtype=FLOAT_KV_DTYPES[kv_dtype]).element_size()
    elif kv_dtype == "int8":  # codes + one scale per (token, kv head)
        per_tensor = elems + block_size * arch.num_kv_heads * scale_bytes
    elif kv_dtype == "int4":  # codes + scale and zero point
        per_tensor = elems // 2 + block_size * arch.num_kv_heads * 2 * scale_bytes
    else:
        raise ValueError(f"kv_cache_dtype: unsupported {kv_dtype!r}")
    return 2 * arch.num_layers * per_tensor


def activation_reserve(arch: ArchConfig, max_num_batched_tokens: int, max_num_seqs: int,
                       dtype: torch.dtype) -> int:
    """A generous estimate of the peak activation memory of one step."""
    elem = torch.tensor([], dtype=dtype).element_size()
    per_token = (4 * arch.hidden_size + 3 * arch.intermediate_size
                 + (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim) * elem
    logits = max(max_num_seqs, 256) * arch.vocab_size * 4 * 3
    return max_num_batched_tokens * per_token * 2 + logits + (512 << 20)


def compute_num_blocks(arch: ArchConfig, cache: CacheConfig, kv_dtype: str, device: torch.device,
                       reserve_bytes: int, max_useful_blocks: int) -> int:
    per_block = bytes_per_block(arch, cache.block_size, kv_dtype)
    if cache.kv_cache_memory is not None:
        budget = cache.kv_cache_memory
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * cache.gpu_memory_utilization) - reserve_bytes
    else:
        budget = cache.cpu_kv_cache_memory
    num_blocks = min(budget // per_block, max_useful_blocks)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_memory: {budget} bytes hold no KV block ({per_block} bytes each, "
                         f"block_size {cache.block_size}); give the cache more memory")
    return int(num_blocks)


def allocate_kv_caches(arch: ArchConfig, num_blocks: int, block_size: int, kv_dtype: str,
                       device: torch.device) -> list[LayerKVCache]:
    """One zeroed ``LayerKVCache`` per layer in the engine's layouts (``new_layer_kv_cache``)."""
    return [new_layer_kv_cache(num_blocks, block_size, arch.num_kv_heads, arch.head_dim, kv_dtype, device)
            for _ in range(arch.num_layers)]
