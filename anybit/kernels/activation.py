"""SiLU-and-multiply, the gated activation of Llama's MLP (Shazeer 2020, GLU variants)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from anybit.kernels.pdl import pdl_early, pdl_enabled, pdl_launch
from anybit.layers.pending import PendingSum


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x ``[num_tokens, 2*d]`` -> ``silu(x[:, :d]) * x[:, d:]`` ``[num_tokens, d]`` in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim of x must be even (2*d), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, d, stride_x, stride_y, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False, EARLY: tl.constexpr = False, X_ACC: tl.constexpr = False):
    """Grid (num_tokens, cdiv(d, BLOCK)); rounds silu to the dtype before the product, like torch.
    PDL: waits for the previous kernel first (anybit/kernels/pdl.py); EARLY: the next kernel may
    launch at once (``pdl_early``); without it the kernel does not trigger (as rms_norm's, s28-12).
    X_ACC: x is a GEMV's float32 accumulator (anybit/layers/pending.py): rounded to y's dtype on
    load, then zeroed."""
    if PDL and EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    a = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    b = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0)
    if X_ACC:
        a = a.to(y_ptr.dtype.element_ty)
        b = b.to(y_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + offs, tl.zeros([BLOCK], tl.float32), mask=mask)
        tl.store(x_ptr + row * stride_x + d + offs, tl.zeros([BLOCK], tl.float32), mask=mask)
    af = a.to(tl.float32)
    act = (af / (1.0 + tl.exp(-af))).to(a.dtype)
    y = (act.to(tl.float32) * b.to(tl.float32)).to(a.dtype)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)


def silu_and_mul(x) -> torch.Tensor:
    """Triton SiLU-and-mul: x ``[num_tokens, 2*d]`` -> ``silu(x[:, :d]) * x[:, d:]`` ``[num_tokens, d]``.
    x may be a PendingSum (anybit/layers/pending.py), which is consumed."""
    x_acc = isinstance(x, PendingSum)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim of x must be even (2*d), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2 = x.acc if x_acc else x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        raise ValueError("silu_and_mul: x must be contiguous in its last dim")
    y = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x2.device)
    block = min(triton.next_power_of_2(d), 2048)
    if x2.shape[0]:
        pdl = pdl_enabled(x2.device)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, y, d, x2.stride(0), y.stride(0),
                                                                   BLOCK=block, PDL=pdl,
                                                                   EARLY=pdl_early(x2.device), X_ACC=x_acc,
                                                                   num_warps=4, **pdl_launch(x2.device))
    if x_acc:
        x.consumed()
    return y.view(*x.shape[:-1], d)
