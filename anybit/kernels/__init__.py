"""Triton kernels of anybit, one file per kernel family, each with its plain-torch ``ref_`` twin.

Every op has three names: ``_op_kernel`` (``@triton.jit``), ``op(...)`` (launcher: checks shapes
and dtypes, picks block sizes) and ``ref_op(...)`` (plain torch: the CPU path and the test oracle).
Import the submodules directly (``from anybit.kernels.attention_decode import ...``).

CPU-only processes: when no CUDA device exists, ``TRITON_INTERPRET=1`` is set (unless already set)
before any kernel module is imported, so ``@triton.jit`` kernels run through Triton's interpreter
on CPU tensors (tests) instead of failing; the engine itself uses the ``ref_`` ops on CPU.

Interpreter compatibility: under ``TRITON_INTERPRET=1`` (CPU tests) Triton 3.6 turns a scalar
into a 1-element numpy array, and numpy >= 2.4 refuses ``int()`` of such an array, which breaks
every loop whose bounds depend on a program id or a loaded value (``range(start, end, BLOCK)``).
``_patch_interpreter`` makes ``__index__`` take the single element; it only runs in interpreter mode.
"""

from __future__ import annotations

import os


def _patch_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton missing
        return
    if getattr(interpreter, "_anybit_index_patch", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._anybit_index_patch = True


def _default_to_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_default_to_interpreter()
_patch_interpreter()
