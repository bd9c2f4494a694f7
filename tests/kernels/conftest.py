"""Kernel tests run on CPU through Triton's interpreter; set it before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
