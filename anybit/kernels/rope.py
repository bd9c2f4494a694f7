"""Rotary position embedding (RoFormer, Su et al. 2021) on query and key.

``cos_sin_cache [max_positions, rotary_dim]`` float32 holds cos in the first half and sin in the
second half of each row. Neox style rotates the two halves of the first ``rotary_dim`` channels
(HF ``rotate_half``); GPT-J style rotates interleaved pairs ``(2i, 2i+1)``. Channels past
``rotary_dim`` pass through unchanged.
"""

from __future__ import annotations

import torch


def _check_rope_args(positions, query, key, cos_sin_cache):
    if query.dim() != 3 or key.dim() != 3 or query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim] and key "
                         f"[num_tokens, num_kv_heads, head_dim], got {tuple(query.shape)} and "
                         f"{tuple(key.shape)}")
    if positions.shape != (query.shape[0],):
        raise ValueError(f"positions must be [num_tokens={query.shape[0]}], got {tuple(positions.shape)}")
    rot = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot % 2 or rot > query.shape[2]:
        raise ValueError(f"cos_sin_cache must be [max_positions, rotary_dim] with even rotary_dim "
                         f"<= head_dim={query.shape[2]}, got {tuple(cos_sin_cache.shape)}")


def _ref_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x ``[num_tokens, heads, head_dim]``; cos/sin ``[num_tokens, 1, rotary_dim // 2]`` float32."""
    half = cos.shape[-1]
    rot = 2 * half
    xf = x.float()
    if is_neox:
        x1, x2 = xf[..., :half], xf[..., half:rot]
    else:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    out = xf.clone()
    if is_neox:
        out[..., :half], out[..., half:rot] = o1, o2
    else:
        out[..., 0:rot:2], out[..., 1:rot:2] = o1, o2
    return out.to(x.dtype)


def ref_rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """Rotate ``query [num_tokens, num_heads, head_dim]`` and ``key [num_tokens, num_kv_heads,
    head_dim]`` by ``positions [num_tokens]``. Returns new tensors ``(query, key)``, input dtypes."""
    _check_rope_args(positions, query, key, cos_sin_cache)
    cs = cos_sin_cache[positions.long()].float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    return _ref_rotate(query, cos, sin, is_neox), _ref_rotate(key, cos, sin, is_neox)
