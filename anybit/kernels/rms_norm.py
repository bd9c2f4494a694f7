"""RMSNorm (Zhang & Sennrich 2019) and the fused residual-add + RMSNorm.

``y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`` with the statistics in float32, as in
Hugging Face Llama.
"""

from __future__ import annotations

import torch


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x ``[..., hidden]``, weight ``[hidden]`` -> y ``[..., hidden]`` in x's dtype."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [hidden={x.shape[-1]}], got {tuple(weight.shape)}")
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def ref_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``new_residual = x + residual``; ``y = rms_norm(new_residual)``. Returns ``(y, new_residual)``."""
    if x.shape != residual.shape:
        raise ValueError(f"x and residual must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(residual.shape)}")
    new_residual = (x + residual).to(x.dtype)
    return ref_rms_norm(new_residual, weight, eps), new_residual
