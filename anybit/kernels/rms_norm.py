"""RMSNorm (Zhang & Sennrich 2019) and the fused residual-add + RMSNorm.

``y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * weight`` with the statistics in float32, as in
Hugging Face Llama.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anybit.kernels.pdl import pdl_early, pdl_enabled, pdl_launch
from anybit.layers.pending import PendingSum


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


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, newr_ptr, hidden, eps,
                     stride_x, stride_r, stride_y, stride_nr,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                     EARLY: tl.constexpr = False, X_ACC: tl.constexpr = False):
    """One program per row: y = (x * rsqrt(mean(x^2) + eps)).to(dtype) * w (+ residual add first).
    PDL: the weight is loaded before waiting for the previous kernel (anybit/kernels/pdl.py);
    EARLY: the next kernel may launch at once (``pdl_early``); without it the kernel does not trigger
    (the next kernel launches when this one completes). The trigger is the first instruction or none:
    placed after the weight's load and the wait, 17+ programs reading and zeroing a float32
    accumulator got wrong x on the H100 (s28-12), see pdl.py. X_ACC: x is a GEMV's float32
    accumulator (anybit/layers/pending.py): rounded to y's dtype on load, zeroed."""
    if PDL and EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if X_ACC:
        x = x.to(y_ptr.dtype.element_ty)
        tl.store(x_ptr + row * stride_x + offs, tl.zeros([BLOCK], tl.float32), mask=mask)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(newr_ptr + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * stride_y + offs, y, mask=mask)


def _launch_norm(x, residual, weight, eps):
    x_acc = isinstance(x, PendingSum)
    shape, dtype = x.shape, x.dtype
    hidden = shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [hidden={hidden}], got {tuple(weight.shape)}")
    x2 = x.acc if x_acc else x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        raise ValueError("rms_norm: x must be contiguous in its last dim")
    y = torch.empty(x2.shape, dtype=dtype, device=x2.device)
    block = triton.next_power_of_2(hidden)
    warps = min(max(block // 256, 1), 16)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        new_r = torch.empty_like(y)
    else:
        r2, new_r = y, y
    if x2.shape[0]:
        pdl = pdl_enabled(x2.device)
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, new_r, hidden, eps,
                                         x2.stride(0), r2.stride(0), y.stride(0), new_r.stride(0),
                                         HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl,
                                         EARLY=pdl_early(x2.device), X_ACC=x_acc, num_warps=warps,
                                         **pdl_launch(x2.device))
    if x_acc:
        x.consumed()
    return y.view(shape), new_r.view(shape)


def rms_norm(x, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm. x ``[..., hidden]`` (a tensor or a PendingSum, which is consumed), weight
    ``[hidden]`` -> y ``[..., hidden]`` in x's dtype."""
    return _launch_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Triton fused residual add + RMSNorm: returns ``(rms_norm(x + residual), x + residual)``;
    x may be a PendingSum (consumed)."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x and residual must match in shape and dtype, got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(residual.shape)} {residual.dtype}")
    return _launch_norm(x, residual, weight, eps)
