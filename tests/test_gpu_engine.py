"""GPU: the Triton backend (with CUDA graphs) generates what the torch reference backend does."""

from __future__ import annotations

import pytest
import torch

from anybit import LLM, SamplingParams
from tests.model_factory import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over the lazy dog. Paged attention",
           "héllo 日本語", "import os\nimport sys\nprint('hello world')\nfor i in range(10):\n"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kv", ["auto", "int8", "int4"])
def test_triton_backend_matches_torch_backend(tmp_path, arch, kv):
    path = make_tiny_model(tmp_path / arch, arch=arch, hidden_size=128, num_attention_heads=4,
                           num_key_value_heads=2 if arch != "mistral" else 1, head_dim=32)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, dtype="float32", device="cuda", attention_backend=backend, block_size=16,
                  kv_cache_dtype=kv, kv_cache_memory=64 << 20, progress=False)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        if backend == "triton":
            assert llm.engine.runner.graph_runner is not None and llm.engine.runner.graph_runner.captured
    agree = sum(a == b for a, b in zip(outs["torch"], outs["triton"]))
    # int4 KV: round-to-nearest ties in the two quantize-on-write paths may pick different codes
    # on a random model with near-tied logits; allow one diverging prompt there, none otherwise.
    assert agree >= len(PROMPTS) - (1 if kv == "int4" else 0), (outs["torch"], outs["triton"])
