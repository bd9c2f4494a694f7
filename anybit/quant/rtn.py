"""Round-to-nearest (RTN) quantization and the per-group quantizer GPTQ shares.

``QuantSpec(bits, group_size, fmt)`` says how one weight is quantized; ``GroupQuantizer`` fits
the parameters of one group of columns (scale + zero, or an absmax scale for codebooks) and
rounds a column; ``rtn_quantize(W, spec)`` quantizes a whole ``W [N, K]`` into a
``PackedWeight`` with no data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anybit.quant.format import (
    PackedWeight,
    builtin_codebook,
    check_bits,
    check_format,
    pack_codes,
    resolve_group_size,
)


@dataclass(frozen=True)
class QuantSpec:
    """bits in 1..8; group_size 32/64/128/... or -1 (per output channel); fmt uniform|nf4|fp4|learned;
    act_order (GPTQ): columns stored in a permuted order, checkpoint carries a ``perm`` tensor."""

    bits: int = 4
    group_size: int = 128
    fmt: str = "uniform"
    act_order: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        check_format(self.fmt, self.bits)
        if self.group_size not in (-1, 0) and (self.group_size < 32 or self.group_size % 32):
            raise ValueError(f"group_size: got {self.group_size}, allowed: a multiple of 32 or -1")

    def to_dict(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size, "format": self.fmt}
        if self.act_order:
            d["act_order"] = True
        return d


def learn_codebook(W: torch.Tensor, bits: int, group_size: int, iters: int = 20) -> torch.Tensor:
    """1-D k-means (Lloyd) on the absmax-normalized weights -> table float32 ``[2**bits]``."""
    N, K = W.shape
    G = resolve_group_size(group_size, K)
    w = W.float().reshape(N, K // G, G)
    v = (w / w.abs().amax(-1, keepdim=True).clamp_min(1e-12)).flatten()
    dev = v.device  # W's device (a GPU when quantizing there), for every tensor made here
    if v.numel() > 1 << 20:  # a fixed subsample keeps this fast and deterministic
        v = v[torch.linspace(0, v.numel() - 1, 1 << 20, device=dev).long()]
    n = 2 ** bits
    table = torch.quantile(v, torch.linspace(0, 1, n, device=dev)).contiguous()
    for _ in range(iters):
        idx = torch.bucketize(v, (table[1:] + table[:-1]) / 2)
        sums = torch.zeros(n, device=dev).index_add_(0, idx, v)
        counts = torch.zeros(n, device=dev).index_add_(0, idx, torch.ones_like(v))
        table = torch.where(counts > 0, sums / counts.clamp_min(1), table).sort().values
    return table


class GroupQuantizer:
    """Fits and applies one group's parameters. For uniform: scale/zero per row; codebook: scale."""

    def __init__(self, spec: QuantSpec, codebook: torch.Tensor | None = None):
        self.spec = spec
        self.maxq = 2 ** spec.bits - 1
        self.codebook = codebook if codebook is not None else builtin_codebook(spec.fmt, spec.bits)
        if spec.fmt != "uniform" and self.codebook is None:
            raise ValueError(f"format {spec.fmt!r} needs a codebook table")
        if self.codebook is not None:
            self.codebook = self.codebook.float()
            self._mids = (self.codebook[1:] + self.codebook[:-1]) / 2

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w ``[N, G]`` -> (scale ``[N]``, zero ``[N]`` or None); rounded to float16 as stored."""
        w = w.float()
        if self.spec.fmt == "uniform":
            lo = w.amin(1).clamp(max=0)
            hi = w.amax(1).clamp(min=0)
            scale = ((hi - lo) / self.maxq).clamp_min(1e-8).half().float()
            zero = torch.round(-lo / scale).clamp(0, self.maxq)
            return scale, zero
        scale = w.abs().amax(1).clamp_min(1e-8).half().float()
        return scale, None

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None):
        """w ``[N]`` or ``[N, G]`` with per-row scale/zero -> (codes int64, dequantized float32)."""
        s = scale if w.dim() == 1 else scale[:, None]
        if self.spec.fmt == "uniform":
            z = zero if w.dim() == 1 else zero[:, None]
            q = torch.clamp(torch.round(w / s) + z, 0, self.maxq)
            return q.long(), (q - z) * s
        table = self.codebook.to(w.device)
        q = torch.bucketize((w / s).contiguous(), self._mids.to(w.device))
        return q.long(), table[q] * s


def make_quantizer(W: torch.Tensor, spec: QuantSpec) -> GroupQuantizer:
    cb = learn_codebook(W, spec.bits, spec.group_size) if spec.fmt == "learned" else None
    return GroupQuantizer(spec, cb)


def build_packed(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 spec: QuantSpec, quantizer: GroupQuantizer,
                 perm: torch.Tensor | None = None) -> PackedWeight:
    """codes ``[N, K]``, scales/zeros ``[K//G, N]`` float -> PackedWeight (float16 scales/zeros)."""
    N, K = codes.shape
    G = resolve_group_size(spec.group_size, K)
    return PackedWeight(
        qweight=pack_codes(codes, spec.bits), scales=scales.half().contiguous(),
        zeros=None if zeros is None else zeros.half().contiguous(), bits=spec.bits, group_size=G,
        in_features=K, out_features=N, fmt=spec.fmt,
        codebook=None if quantizer.codebook is None else quantizer.codebook.clone(), perm=perm)


def rtn_quantize(W: torch.Tensor, spec: QuantSpec) -> PackedWeight:
    """Round-to-nearest, group by group. W ``[N, K]`` (any float dtype) -> PackedWeight."""
    N, K = W.shape
    if K % 32:
        raise ValueError(f"in_features: {K} must be a multiple of 32")
    G = resolve_group_size(spec.group_size, K)
    quantizer = make_quantizer(W, spec)
    Wf = W.float()
    codes = torch.empty(N, K, dtype=torch.int64)
    scales = torch.empty(K // G, N)
    zeros = torch.empty(K // G, N) if spec.fmt == "uniform" else None
    for g in range(K // G):
        w = Wf[:, g * G:(g + 1) * G]
        s, z = quantizer.fit(w)
        codes[:, g * G:(g + 1) * G], _ = quantizer.quantize(w, s, z)
        scales[g] = s
        if zeros is not None:
            zeros[g] = z
    return build_packed(codes, scales, zeros, spec, quantizer)
