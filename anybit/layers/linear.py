"""Linear layers (plain and fused QKV / gate_up) whose weights are owned by a ``QuantMethod``.

The layer only knows its shape; the QuantMethod creates the parameters, loads checkpoint
tensors into them (per shard for fused layers), post-processes them once after loading
(repacking for a kernel layout, say) and computes ``y = x @ W^T + b``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from anybit.layers.pending import as_tensor


class QuantMethod:
    """Strategy that owns a Linear layer's weights. Subclasses: UnquantizedMethod here,
    quantized formats in ``layers/quant_linear.py``."""

    def create_weights(self, layer: Linear) -> None:
        raise NotImplementedError

    def load_weight(self, layer: Linear, name: str, tensor: torch.Tensor, shard_id: str | None) -> None:
        raise NotImplementedError

    def process_after_loading(self, layer: Linear) -> None:
        """Called once after every tensor is loaded."""

    def apply(self, layer: Linear, x: torch.Tensor, pending: bool = False):
        """y = x @ W^T (+ b). ``pending``: the caller can take a ``PendingSum``
        (anybit/layers/pending.py) instead of a tensor; methods that cannot produce one ignore it."""
        raise NotImplementedError

    def expected_tensors(self, layer: Linear) -> list[tuple[str, str | None]]:
        """(name, shard_id) pairs a checkpoint must provide for this layer."""
        raise NotImplementedError


class UnquantizedMethod(QuantMethod):
    """Dense weight [sum(output_sizes), in_features] in the model dtype; fused shards are
    concatenated along the output dimension in ``shard_ids`` order."""

    def create_weights(self, layer: Linear) -> None:
        out = sum(layer.output_sizes)
        layer.weight = nn.Parameter(torch.empty(out, layer.in_features, dtype=layer.dtype),
                                    requires_grad=False)

    def load_weight(self, layer: Linear, name: str, tensor: torch.Tensor, shard_id: str | None) -> None:
        if name != "weight":
            raise ValueError(f"unexpected tensor {name!r} for an unquantized linear layer")
        start, size = layer.shard_range(shard_id)
        expected = (size, layer.in_features)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"shape {tuple(tensor.shape)} does not match the expected {expected}")
        layer.weight.data[start:start + size].copy_(tensor)

    def apply(self, layer: Linear, x: torch.Tensor, pending: bool = False) -> torch.Tensor:
        w = layer.weight
        if (BF16_GEMV and x.is_cuda and w.dtype in _GEMV_DTYPES and x.dtype == w.dtype
                and x.numel() == x.shape[-1] and not _interpreting()
                and (BF16_GEMV_MAX_NUMEL is None or w.numel() <= BF16_GEMV_MAX_NUMEL)):
            # one token (batch-1 decode): our GEMV (anybit/kernels/gemv_bf16.py), PDL-capable,
            # instead of cuBLAS; x flattened to [1, K]
            from anybit.kernels.gemv_bf16 import gemv_bf16
            x2 = x.reshape(1, x.shape[-1])
            if x2.stride(1) != 1:
                x2 = x2.contiguous()
            return gemv_bf16(x2, w, layer.bias).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, layer.bias)

    def expected_tensors(self, layer: Linear) -> list[tuple[str, str | None]]:
        return [("weight", s) for s in layer.shard_ids]


# M = 1 fp16/bf16 linears on CUDA go to anybit's Triton GEMV (anybit/kernels/gemv_bf16.py) instead of
# cuBLAS unless this is False (set ANYBIT_BF16_GEMV=0 before import, or assign at run time)
BF16_GEMV = os.environ.get("ANYBIT_BF16_GEMV", "1") != "0"
BF16_GEMV_MAX_NUMEL: int | None = None  # weights with more elements keep cuBLAS (None: no limit)
_GEMV_DTYPES = (torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class Linear(nn.Module):
    """y = x @ W^T (+ b). x: [..., in_features] -> y: [..., sum(output_sizes)].

    output_sizes / shard_ids: one entry per fused part, e.g. [q, k, v] sizes with ["q","k","v"];
    a plain layer has one part whose shard_id is None.
    """

    def __init__(self, in_features: int, output_sizes: list[int], shard_ids: list[str | None] | None = None,
                 bias: bool = False, dtype: torch.dtype = torch.float32,
                 quant_method: QuantMethod | None = None):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.shard_ids = list(shard_ids) if shard_ids is not None else [None]
        if len(self.shard_ids) != len(self.output_sizes):
            raise ValueError("shard_ids and output_sizes must have the same length")
        self.out_features = sum(self.output_sizes)
        self.dtype = dtype
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
        else:
            self.bias = None

    def shard_range(self, shard_id: str | None) -> tuple[int, int]:
        """(start, size) of a fused part along the output dimension."""
        if shard_id not in self.shard_ids:
            raise ValueError(f"unknown shard {shard_id!r}; this layer has {self.shard_ids}")
        index = self.shard_ids.index(shard_id)
        return sum(self.output_sizes[:index]), self.output_sizes[index]

    def load_weight(self, name: str, tensor: torch.Tensor, shard_id: str | None = None) -> None:
        if name == "bias":
            if self.bias is None:
                raise ValueError("checkpoint has a bias but the layer has none")
            start, size = self.shard_range(shard_id)
            if tuple(tensor.shape) != (size,):
                raise ValueError(f"bias shape {tuple(tensor.shape)} does not match the expected {(size,)}")
            self.bias.data[start:start + size].copy_(tensor)
            return
        self.quant_method.load_weight(self, name, tensor, shard_id)

    def expected_tensors(self) -> list[tuple[str, str | None]]:
        names = self.quant_method.expected_tensors(self)
        if self.bias is not None:
            names += [("bias", s) for s in self.shard_ids]
        return names

    def process_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)

    def forward(self, x, pending: bool = False):
        """x ``[..., in_features]`` (a tensor or a PendingSum) -> y ``[..., out_features]``;
        ``pending``: a PendingSum may be returned (the caller's consumer finishes it)."""
        x = as_tensor(x)
        if pending:
            return self.quant_method.apply(self, x, pending=True)
        return self.quant_method.apply(self, x)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.output_sizes}, shards={self.shard_ids}, "
                f"method={type(self.quant_method).__name__}")
