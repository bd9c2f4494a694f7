"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight column by column and spread each column's
rounding error over the not-yet-quantized columns through the inverse Hessian of the layer
inputs, ``H = 2/n * sum_i x_i x_i^T``.

``HessianAccumulator`` collects H from calibration inputs ``[tokens, K]``; ``gptq_quantize(W, H,
spec)`` returns a ``PackedWeight`` (with ``perm`` when ``spec.act_order``: columns are quantized
in order of decreasing ``diag(H)`` and stored in that order, so groups stay contiguous).
"""

from __future__ import annotations

import torch

from anybit.quant.format import PackedWeight, resolve_group_size
from anybit.quant.rtn import QuantSpec, build_packed, make_quantizer


class HessianAccumulator:
    """Running ``H = 2/n sum x x^T`` over inputs x ``[tokens, K]`` (float32 or float64)."""

    def __init__(self, in_features: int, device="cpu", dtype=torch.float32):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.dtype).to(self.H.device)
        t = x.shape[0]
        if t == 0:
            return
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float = 0.01,
                  blocksize: int = 128) -> PackedWeight:
    """W ``[N, K]``, H ``[K, K]`` -> PackedWeight. Raises ValueError on shape mismatch."""
    N, K = W.shape
    if tuple(H.shape) != (K, K):
        raise ValueError(f"H: expected [{K}, {K}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if K % 32:
        raise ValueError(f"in_features: {K} must be a multiple of 32")
    G = resolve_group_size(spec.group_size, K)
    dev = W.device
    W = W.float().clone()
    H = H.float().to(dev).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if spec.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    quantizer = make_quantizer(W, spec)
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(K, device=dev)
    Hinv = _inverse_cholesky_upper(H)

    codes = torch.empty(N, K, dtype=torch.int64, device=dev)
    scales = torch.empty(K // G, N, device=dev)
    zeros = torch.empty(K // G, N, device=dev) if spec.fmt == "uniform" else None
    bs = max(blocksize, G) if G < K else blocksize
    if G < K and bs % G:
        bs = G
    s = z = None
    if G == K:  # one group per output channel: parameters from the whole row
        s, z = quantizer.fit(W)
        scales[0] = s
        if zeros is not None:
            zeros[0] = z
    for i1 in range(0, K, bs):
        i2 = min(i1 + bs, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if G < K and col % G == 0:  # a group starts: fit on its current (error-updated) values
                s, z = quantizer.fit(W1[:, i:i + G])
                scales[col // G] = s
                if zeros is not None:
                    zeros[col // G] = z
            w = W1[:, i]
            q, dq = quantizer.quantize(w, s, z)
            codes[:, col] = q
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return build_packed(codes.cpu(), scales.cpu(), None if zeros is None else zeros.cpu(), spec,
                        quantizer, perm=None if perm is None else perm.to(torch.int32).cpu())


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, adding more damping if H is not positive definite."""
    eye = torch.eye(H.shape[0], device=H.device)
    extra = 0.0
    for _ in range(6):
        try:
            L = torch.linalg.cholesky(H + extra * eye)
            Hi = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hi, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            extra = max(extra * 10, 1e-2 * float(torch.mean(torch.diag(H))))
    raise ValueError("Hessian is not positive definite even after damping; check the calibration data")
