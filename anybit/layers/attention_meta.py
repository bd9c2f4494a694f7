"""Boundary types of the attention path: the per-layer paged KV cache and the per-step metadata.

In: built by ``runtime/kv_cache.py`` (LayerKVCache) and ``runtime/model_runner.py``
(AttentionMetadata). Out: passed explicitly down ``model.forward`` to every attention backend
and kernel. The exact layout is documented in docs/interfaces.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LayerKVCache:
    """One layer's paged K/V cache.

    key, value: [num_blocks, block_size, num_kv_heads, head_dim] (int4: head_dim // 2 uint8); the
        engine stores them head-major inside a page (``kv_code_buffer``)
    key_scale, value_scale: [num_blocks, block_size, num_kv_heads] KV_SCALE_DTYPE for int8/int4
    key_zero, value_zero: [num_blocks, block_size, num_kv_heads] KV_SCALE_DTYPE for int4

    Kernels address scales through their strides (any layout works; scales and zero points must
    share strides). The engine packs them per (page, kv head) (``kv_scale_buffers``).
    """

    key: torch.Tensor
    value: torch.Tensor
    dtype: str
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None
    key_zero: torch.Tensor | None = None
    value_zero: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.key.shape[0]

    @property
    def block_size(self) -> int:
        return self.key.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[2]

    @property
    def is_quantized(self) -> bool:
        return self.dtype in ("int8", "int4")


SCALE_LAYOUTS = ("packed", "head", "token")
CODE_LAYOUTS = ("head", "token")


def kv_code_buffer(num_blocks: int, block_size: int, num_kv_heads: int, row: int, dtype: torch.dtype,
                   device: torch.device | str, layout: str = "head") -> torch.Tensor:
    """A zeroed K or V cache ``[num_blocks, block_size, num_kv_heads, row]`` (row = head_dim, or
    head_dim // 2 packed int4 bytes); kernels follow either layout by strides.

    - "head" (the engine's): stored ``[num_blocks, num_kv_heads, block_size, row]``: one kv head's
      rows of a page are contiguous, so a decode program streams ``block_size * row`` bytes;
    - "token": contiguous (a token's heads side by side; one head's rows ``num_kv_heads * row``
      bytes apart)."""
    if layout == "token":
        return torch.zeros(num_blocks, block_size, num_kv_heads, row, dtype=dtype, device=device)
    if layout != "head":
        raise ValueError(f"code layout must be one of {CODE_LAYOUTS}, got {layout!r}")
    buf = torch.zeros(num_blocks, num_kv_heads, block_size, row, dtype=dtype, device=device)
    return buf.permute(0, 2, 1, 3)


# Storage type of the int8 / int4 caches' per-(token, kv head) scales and zero points. float16 since
# session 18 (float32 before): int4 moves 136 instead of 144 bytes per token and kv head (K and V codes
# 2 x 64, scales and zero points 4 x 2), int8 260 instead of 264; relative rounding 2^-11, far below
# the codes' steps (1/15 and 1/254 of a row's range). Values beyond +-65504 are clamped on write.
KV_SCALE_DTYPE = torch.float16


def kv_scale_buffers(num_blocks: int, block_size: int, num_kv_heads: int, count: int,
                     device: torch.device | str, layout: str = "packed") -> list[torch.Tensor]:
    """``count`` zeroed ``KV_SCALE_DTYPE`` per-token arrays (key/value scales, then zero points), each of
    shape ``[num_blocks, block_size, num_kv_heads]``; kernels follow any of these layouts by strides.

    - "packed" (the engine's): one buffer ``[num_blocks, num_kv_heads, count, block_size]``: a
      (page, kv head) keeps all its scales and zero points in ``count * block_size`` contiguous
      floats, read by a decode program in one run;
    - "head": one ``[num_blocks, num_kv_heads, block_size]`` buffer per array;
    - "token": one contiguous ``[num_blocks, block_size, num_kv_heads]`` buffer per array (a head's
      tokens 4 * num_kv_heads bytes apart: one sector per token)."""
    shape = (num_blocks, block_size, num_kv_heads)
    if layout == "token":
        return [torch.zeros(shape, dtype=KV_SCALE_DTYPE, device=device) for _ in range(count)]
    if layout == "head":
        return [torch.zeros(num_blocks, num_kv_heads, block_size, dtype=KV_SCALE_DTYPE,
                            device=device).permute(0, 2, 1) for _ in range(count)]
    if layout != "packed":
        raise ValueError(f"scale layout must be one of {SCALE_LAYOUTS}, got {layout!r}")
    buf = torch.zeros(num_blocks, num_kv_heads, count, block_size, dtype=KV_SCALE_DTYPE, device=device)
    return [buf[:, :, i, :].permute(0, 2, 1) for i in range(count)]


FLOAT_KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def new_layer_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, kv_dtype: str,
                       device: torch.device | str, code_layout: str = "head",
                       scale_layout: str = "packed") -> LayerKVCache:
    """A zeroed cache of one layer: codes by ``kv_code_buffer``, int8 / int4 scales (and int4 zero
    points) by ``kv_scale_buffers``; the defaults are the engine's layouts."""
    if kv_dtype in FLOAT_KV_DTYPES:
        dt, row, count = FLOAT_KV_DTYPES[kv_dtype], head_dim, 0
    elif kv_dtype == "int8":
        dt, row, count = torch.int8, head_dim, 2
    elif kv_dtype == "int4":
        if head_dim % 2:
            raise ValueError(f"kv_cache_dtype: int4 needs an even head_dim, got {head_dim}")
        dt, row, count = torch.uint8, head_dim // 2, 4
    else:
        raise ValueError(f"kv_cache_dtype: unsupported {kv_dtype!r} (allowed: {', '.join(FLOAT_KV_DTYPES)}, "
                         "int8, int4)")
    key, value = (kv_code_buffer(num_blocks, block_size, num_kv_heads, row, dt, device, code_layout)
                  for _ in range(2))
    scales = kv_scale_buffers(num_blocks, block_size, num_kv_heads, count, device, scale_layout)
    return LayerKVCache(key, value, kv_dtype, *scales)


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs. Sequences are ordered decodes first, then prefill chunks.

    query_start_loc: [num_seqs + 1] int32; seq_lens: [num_seqs] int32 (context incl. this step);
    block_table: [num_seqs, max_blocks_per_seq] int32; slot_mapping: [num_tokens] int64.
    decode_splits: fixed split count of the decode kernel (a short-context CUDA graph: 1).
    """

    num_seqs: int
    num_decodes: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    decode_splits: int | None = None  # CUDA-graph runner: decode split count (None: sized from max_seq_len)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes
