"""Architecture name (config.json ``architectures[0]``) -> model class."""

from __future__ import annotations

from anybit.models.arch import SUPPORTED_ARCHITECTURES
from anybit.models.llama import LlamaForCausalLM

_REGISTRY = {name: LlamaForCausalLM for name in SUPPORTED_ARCHITECTURES}


def get_model_class(architecture: str):
    if architecture not in _REGISTRY:
        raise ValueError(f"architecture {architecture!r} is not supported; "
                         f"supported: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[architecture]
