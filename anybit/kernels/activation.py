"""SiLU-and-multiply, the gated activation of Llama's MLP (Shazeer 2020, GLU variants)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x ``[num_tokens, 2*d]`` -> ``silu(x[:, :d]) * x[:, d:]`` ``[num_tokens, d]`` in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim of x must be even (2*d), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
