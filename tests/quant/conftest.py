"""Quantization tests run on CPU; Triton kernels through the interpreter (set before import)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/model_factory.py
