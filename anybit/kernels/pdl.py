"""Programmatic dependent launch (PDL, Hopper and newer) for the decode chain's small kernels.

A kernel launched with ``launch_pdl=True`` may start while the previous kernel in the stream is
still running. Such a kernel reads nothing the previous kernels write before
``tl.extra.cuda.gdc_wait()`` (which returns once the previous grid has completed and its memory is
visible; since every PDL kernel waits, completion is transitive along the chain), so it can use
the time to load what does not depend on them (weights, scales, positions) and hides the launch
gap. ``gdc_launch_dependents()`` lets the next kernel start early. Kernels take a ``PDL``
constexpr: False compiles neither instruction (CPU interpreter, older GPUs, ``ANYBIT_PDL=0``).
Works under CUDA-graph capture (the dependency becomes a programmatic graph edge).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=8)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device, want: bool | None = None) -> bool:
    """True on CUDA devices of compute capability >= 9 unless interpreting, or ``want`` is False,
    or (``want`` None) ``ANYBIT_PDL=0`` is set."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1" or want is False:
        return False
    if want is None and os.environ.get("ANYBIT_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def pdl_early(device: torch.device) -> bool:
    """Whether the short kernels of the decode chain (norms, activation) let the next kernel launch
    at their start (``ANYBIT_PDL_EARLY=0`` turns it off: then they do not trigger at all, and the next
    kernel launches when they complete). Until session 28 the off setting triggered after the wait.
    On the H100 that placement made 17+ RMSNorm programs that load their weight, wait, trigger, then
    read and zero a float32 accumulator read wrong x, even with no dependent launched. s28-11/12: wrong
    whenever the trigger came after a load (before or after the wait) and x was zeroed after its read;
    right with the trigger first, with no trigger, or with no load before the trigger.
    Found by the early-trigger engine test once prefill at M 33-64 produced pending sums. On: the next
    GEMV is then launched while the GEMV before the short kernel runs, and its programs become
    resident (loading their first weight tile) as that GEMV's programs retire. Measured on the H100
    (s8-1, batch-1 W4 decode graph): 2.448 -> 2.388 ms. Safe because a PDL kernel reads its inputs
    only after its own wait, which returns once the previous grid has completed (transitively all
    earlier ones), and a dependent launches only after every program of the grid before it has
    started, so the GEMVs' split-K counters are never used by two grids at once."""
    return pdl_enabled(device) and os.environ.get("ANYBIT_PDL_EARLY", "1") != "0"


def pdl_launch(device: torch.device) -> dict:
    """Extra launch keywords: ``{"launch_pdl": True}`` when PDL is on for ``device``, else {}."""
    return {"launch_pdl": True} if pdl_enabled(device) else {}
