"""Triton kernels of anybit, one file per kernel family, each with its plain-torch ``ref_`` twin.

Every op has three names: ``_op_kernel`` (``@triton.jit``), ``op(...)`` (launcher: checks shapes
and dtypes, picks block sizes) and ``ref_op(...)`` (plain torch: the CPU path and the test oracle).
Import the submodules directly (``from anybit.kernels.attention_decode import ...``); this package
file imports nothing so that CPU-only code never pays for Triton compilation.
"""
