"""SiLU-and-multiply, the gated activation of Llama's MLP (Shazeer 2020, GLU variants)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from anybit.kernels.pdl import pdl_early, pdl_enabled, pdl_launch


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x ``[num_tokens, 2*d]`` -> ``silu(x[:, :d]) * x[:, d:]`` ``[num_tokens, d]`` in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim of x must be even (2*d), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, d, stride_x, stride_y, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
    """Grid (num_tokens, cdiv(d, BLOCK)); rounds silu to the dtype before the product, like torch.
    PDL: waits for the previous kernel first (anybit/kernels/pdl.py); EARLY: the next kernel may
    launch at once (``pdl_early``), not only after the wait."""
    if PDL and EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
        if not EARLY:
            tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    a = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0)
    af = a.to(tl.float32)
    act = (af / (1.0 + tl.exp(-af))).to(a.dtype)
    y = (act.to(tl.float32) * b.to(tl.float32)).to(a.dtype)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton SiLU-and-mul: x ``[num_tokens, 2*d]`` -> ``silu(x[:, :d]) * x[:, d:]`` ``[num_tokens, d]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim of x must be even (2*d), got {x.shape[-1]}")
    if x.stride(-1) != 1:
        raise ValueError("silu_and_mul: x must be contiguous in its last dim")
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    y = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(d), 2048)
    if x2.shape[0]:
        pdl = pdl_enabled(x.device)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, y, d, x2.stride(0), y.stride(0),
                                                                   BLOCK=block, PDL=pdl,
                                                                   EARLY=pdl_early(x.device), num_warps=4,
                                                                   **pdl_launch(x.device))
    return y.view(*x.shape[:-1], d)
