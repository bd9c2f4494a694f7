"""Gated activation for Llama-family MLPs: silu(gate) * up."""

from __future__ import annotations

import torch
from torch import nn

from anybit.layers.pending import PendingSum


class SiluAndMul(nn.Module):
    """x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from anybit.kernels import activation as k

        return k.silu_and_mul(x) if isinstance(x, PendingSum) or x.is_cuda else k.ref_silu_and_mul(x)
