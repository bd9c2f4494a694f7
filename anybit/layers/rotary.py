"""Rotary position embedding (neox / HF ``rotate_half`` style) with Llama 3 and linear scaling.

The table ``cos_sin_cache [max_positions, rotary_dim]`` (float32, cos in the first half, sin in
the second) is what the kernels in anybit/kernels/rope.py read.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(rotary_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] float32, as Hugging Face computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if not rope_scaling:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low = float(rope_scaling.get("low_freq_factor", 1.0))
        high = float(rope_scaling.get("high_freq_factor", 4.0))
        old_len = float(rope_scaling["original_max_position_embeddings"])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported; "
                     f"allowed: {', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q [num_tokens, num_heads, head_dim] and
    k [num_tokens, num_kv_heads, head_dim] at ``positions`` [num_tokens]."""

    def __init__(self, head_dim: int, max_positions: int, base: float, rope_scaling: dict | None = None,
                 rotary_dim: int | None = None, is_neox: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.is_neox = is_neox
        inv_freq = rope_inv_freq(self.rotary_dim, base, rope_scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        from anybit.kernels import rope

        fn = rope.rotary_embedding if query.is_cuda else rope.ref_rotary_embedding
        return fn(positions, query, key, self.cos_sin_cache, self.is_neox)
