"""A linear layer's output left as a float32 sum for the next kernel to finish (<= 64 rows).

A split-K GEMV normally ends with a serial step: every program stores its partial, passes a fence
and a counter atomic, and the last program of a column tile loads all partials, adds them and
writes y. That step is two or three dependent L2 round trips on the critical path of every
GEMV (s9-1 on the H100: 7% of the batch-1 W4 decode step). With a ``PendingSum`` the programs add
their partials into a zeroed float32 accumulator with fire-and-forget float atomics and exit; the
kernel that consumes y (RMSNorm, SiLU-and-mul, rotary + KV write) loads the sum, rounds it to the
model dtype exactly where the GEMV would have, and stores zeros back, so the accumulator is ready
for the next GEMV. The order of the float32 additions is not fixed, so results can differ from
run to run in the last bits of the float32 sum (``ANYBIT_GEMV_ACC=0`` keeps the ordered split-K
sum). Only produced on CUDA by the packed-half GEMV (one row) and the mma.sync kernel (2-32 rows; 33-64
on weights up to 4096 x 4096 only when quant_matmul's MMA_SQUARE_PENDING_BITS is set, off by default;
short prefills too)
(``quant_linear``), only when the caller asks
(``Linear.forward(x, pending=True)``) and the consumer can take it; ``materialize()`` turns one
into an ordinary tensor anywhere else.

Accumulators are persistent (one per device and output shape), allocated outside CUDA-graph
capture. The model's chain guarantees that a pending sum is consumed before the next GEMV with
the same output shape starts adding (every kernel of the decode chain waits for the one before);
should a sum ever be left unconsumed (an exception between producer and consumer), the next
producer zeroes the accumulator first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

_ACCS: dict = {}  # (device, rows, cols) -> [float32 accumulator, outstanding PendingSum or None]


def gemv_acc_enabled() -> bool:
    """Whether quantized linears may return a PendingSum (``ANYBIT_GEMV_ACC=0`` turns it off)."""
    return os.environ.get("ANYBIT_GEMV_ACC", "1") != "0"


@dataclass(eq=False)
class PendingSum:
    """Stands for ``acc.to(dtype).view(shape)``. acc: float32 ``[rows, cols]`` (contiguous, the
    layer's output as a 2-D matrix); dtype: the model dtype the GEMV would have rounded to; shape:
    the output's shape (``[..., cols]``)."""

    acc: torch.Tensor
    dtype: torch.dtype
    shape: torch.Size
    _key: tuple = field(repr=False, default=())

    def consumed(self) -> None:
        """Called by the consumer when it launches the kernel that reads and zeroes acc."""
        slot = _ACCS.get(self._key)
        if slot is not None and slot[1] is self:
            slot[1] = None

    def materialize(self) -> torch.Tensor:
        """An ordinary tensor of ``shape`` and ``dtype`` (two small torch kernels; for consumers
        without a fused path)."""
        y = self.acc.to(self.dtype).view(self.shape)
        self.acc.zero_()
        self.consumed()
        return y


def as_tensor(x):
    """x itself, or a PendingSum materialized."""
    return x.materialize() if isinstance(x, PendingSum) else x


def new_pending(rows: int, cols: int, dtype: torch.dtype, shape, device: torch.device) -> PendingSum:
    """A PendingSum over the zeroed persistent accumulator for ``[rows, cols]`` on ``device``."""
    key = (str(device), rows, cols)
    slot = _ACCS.get(key)
    if slot is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("GEMV accumulators must be allocated before CUDA-graph capture: run the "
                               "model once outside the graph first")
        slot = _ACCS[key] = [torch.zeros(rows, cols, dtype=torch.float32, device=device), None]
    elif slot[1] is not None:  # the previous sum was never consumed: its values are still there
        slot[0].zero_()
    pending = PendingSum(slot[0], dtype, torch.Size(shape), key)
    slot[1] = pending
    return pending
