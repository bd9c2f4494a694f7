"""Thin nn.Modules; the math lives in anybit/kernels (Triton on CUDA, ``ref_`` torch elsewhere)."""
