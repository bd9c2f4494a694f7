"""RMSNorm, optionally fused with the residual add (Triton on CUDA, torch reference on CPU)."""

from __future__ import annotations

import torch
from torch import nn

from anybit.layers.pending import PendingSum


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32. x: [num_tokens, hidden].

    ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``; without a residual
    it returns ``norm(x)``.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        from anybit.kernels import rms_norm as k

        if isinstance(x, PendingSum) or x.is_cuda:  # a PendingSum exists only on CUDA
            if residual is None:
                return k.rms_norm(x, self.weight, self.eps)
            return k.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return k.ref_rms_norm(x, self.weight, self.eps)
        return k.ref_fused_add_rms_norm(x, residual, self.weight, self.eps)
