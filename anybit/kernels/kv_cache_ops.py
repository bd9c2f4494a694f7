"""Writing K/V into the paged cache, with quantize-on-write for int8/int4 caches.

Layout (docs/interfaces.md, ``LayerKVCache``):
- key/value cache ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the cache dtype;
  int4 stores ``head_dim // 2`` uint8 (element ``2i`` in the low nibble, ``2i+1`` in the high).
- int8: symmetric per (token, kv head): ``scale = amax|x| / 127``, ``q = round(x / scale)``.
- int4: asymmetric per (token, kv head): ``scale = (max - min) / 15``, ``zero = min``,
  ``q = round((x - zero) / scale)`` in ``[0, 15]``; ``x ~= q * scale + zero``.
- A token with slot ``s`` lives at block ``s // block_size``, offset ``s % block_size``;
  slot ``-1`` means "do not write".
"""

from __future__ import annotations

import torch

from anybit.layers.attention_meta import LayerKVCache

_FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
KV_CACHE_DTYPES = ("bfloat16", "float16", "float32", "int8", "int4")
_EPS = 1e-8  # smallest scale used as divisor (a constant row quantizes to zeros)


# ----------------------------------------------------------------------------------------------
# torch references
# ----------------------------------------------------------------------------------------------
def ref_quantize_kv(x: torch.Tensor, dtype: str):
    """Quantize ``x [..., head_dim]`` per row (the last dim) for a cache of ``dtype``.

    Returns ``(q, scale, zero)``: int8 -> q int8 ``[..., head_dim]``, scale float32 ``[...]``,
    zero None; int4 -> q uint8 ``[..., head_dim // 2]`` (packed), scale and zero float32 ``[...]``;
    float dtypes -> ``(x.to(dtype), None, None)``.
    """
    if dtype in _FLOAT_DTYPES:
        return x.to(_FLOAT_DTYPES[dtype]), None, None
    xf = x.float()
    if dtype == "int8":
        scale = xf.abs().amax(dim=-1) / 127.0
        q = torch.round(xf / scale.clamp_min(_EPS).unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        return q, scale, None
    if dtype == "int4":
        if x.shape[-1] % 2:
            raise ValueError(f"int4 KV cache needs an even head_dim, got {x.shape[-1]}")
        lo = xf.amin(dim=-1)
        scale = (xf.amax(dim=-1) - lo) / 15.0
        q = torch.round((xf - lo.unsqueeze(-1)) / scale.clamp_min(_EPS).unsqueeze(-1)).clamp(0, 15)
        q = q.to(torch.uint8)
        packed = q[..., 0::2] | (q[..., 1::2] << 4)
        return packed, scale, lo
    raise ValueError(f"kv cache dtype must be one of {KV_CACHE_DTYPES}, got {dtype!r}")


def ref_dequantize_kv(q: torch.Tensor, scale, zero, dtype: str) -> torch.Tensor:
    """Inverse of ``ref_quantize_kv``: returns float32 ``[..., head_dim]``."""
    if dtype in _FLOAT_DTYPES:
        return q.float()
    if dtype == "int8":
        return q.float() * scale.unsqueeze(-1)
    if dtype == "int4":
        lo = (q & 0xF).float()
        hi = (q >> 4).float()
        codes = torch.stack((lo, hi), dim=-1).flatten(-2)
        return codes * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    raise ValueError(f"kv cache dtype must be one of {KV_CACHE_DTYPES}, got {dtype!r}")


def gather_kv(kv_cache: LayerKVCache, block_row: torch.Tensor, seq_len: int):
    """The first ``seq_len`` tokens of one sequence, dequantized.

    block_row: ``[max_blocks_per_seq]`` int32 (one row of ``block_table``).
    Returns ``(k, v)`` float32 ``[seq_len, num_kv_heads, head_dim]``.
    """
    bs = kv_cache.block_size
    nb = (seq_len + bs - 1) // bs
    blocks = block_row[:nb].long()

    def take(t):
        if t is None:
            return None
        return t[blocks].flatten(0, 1)[:seq_len]

    k = ref_dequantize_kv(take(kv_cache.key), take(kv_cache.key_scale), take(kv_cache.key_zero),
                          kv_cache.dtype)
    v = ref_dequantize_kv(take(kv_cache.value), take(kv_cache.value_scale),
                          take(kv_cache.value_zero), kv_cache.dtype)
    return k, v


def _check_cache_args(key, value, kv_cache: LayerKVCache, slot_mapping):
    if kv_cache.dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache.dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache.dtype!r}")
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must both be [num_tokens, num_kv_heads, head_dim], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [num_tokens={key.shape[0]}], got {tuple(slot_mapping.shape)}")
    hd = key.shape[2] // 2 if kv_cache.dtype == "int4" else key.shape[2]
    want = (kv_cache.block_size, key.shape[1], hd)
    if tuple(kv_cache.key.shape[1:]) != want or kv_cache.value.shape != kv_cache.key.shape:
        raise ValueError(f"kv_cache.key/value must be [num_blocks, {want[0]}, {want[1]}, {want[2]}] "
                         f"for {kv_cache.dtype}, got {tuple(kv_cache.key.shape)}")


def ref_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: LayerKVCache,
                          slot_mapping: torch.Tensor) -> None:
    """Write ``key/value [num_tokens, num_kv_heads, head_dim]`` into the paged cache in place.

    slot_mapping ``[num_tokens]`` int64; slot -1 is skipped. Quantizes on write for int8/int4.
    """
    _check_cache_args(key, value, kv_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for src, dst, s_dst, z_dst in ((key, kv_cache.key, kv_cache.key_scale, kv_cache.key_zero),
                                   (value, kv_cache.value, kv_cache.value_scale, kv_cache.value_zero)):
        q, scale, zero = ref_quantize_kv(src[keep], kv_cache.dtype)
        dst.view(-1, *dst.shape[2:])[slots] = q.to(dst.dtype)
        if scale is not None:
            s_dst.view(-1, s_dst.shape[2])[slots] = scale
        if zero is not None:
            z_dst.view(-1, z_dst.shape[2])[slots] = zero
