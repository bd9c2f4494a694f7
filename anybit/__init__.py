"""anybit: LLM inference at any weight bit width, with a paged KV cache and Triton kernels."""

from anybit.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    if name == "LLM":
        from anybit.llm import LLM

        return LLM
    raise AttributeError(name)
