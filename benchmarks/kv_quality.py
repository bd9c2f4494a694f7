"""Quality of the int8 / int4 KV cache against a full-precision cache (CPU, torch backend).

For the tiny random test models (llama with llama3 rope, mistral with a sliding window, qwen2
with bias) and the built-in trained default model: the largest logit difference over all
prompt positions relative to the logit scale (prefill reads K/V back from the cache, so the
quantized cache is used there too), and greedy agreement over 32 generated tokens: the share of
prompts whose 32 tokens are identical and the mean number of tokens before the first difference.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_result  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n",
    "class Request:\n    def __init__(self, request_id, prompt):\n        self.request_id = request_id\n",
    "for i in range(10):\n    total += i * i\nprint(total)\n",
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values",
    "    return sorted(items, key=lambda item: item[1], reverse=True)\n",
]
GEN = 32


def measure(model_dir: str, name: str, kv: str, ref_llm, dtype: str = "float32") -> dict:
    from anybit import LLM, SamplingParams
    from tests.test_model_correctness import prefill_logits

    llm = LLM(model_dir, dtype=dtype, device="cpu", kv_cache_dtype=kv, progress=False)
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    got = prefill_logits(llm, ids)
    want = prefill_logits(ref_llm, ids)
    rel = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))
    params = SamplingParams(temperature=0.0, max_tokens=GEN, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in ref_llm.generate(PROMPTS, params)]
    b = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    same_prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        same_prefix.append(n)
    return {"model": name, "kv_cache_dtype": kv, "max_rel_logit_diff": rel,
            "greedy_exact_share": sum(n == GEN for n in same_prefix) / len(PROMPTS),
            "mean_tokens_before_divergence": sum(same_prefix) / len(same_prefix)}


def use_scale_dtype(name: str) -> None:
    """Store the caches' scales and zero points as ``name`` (float16: the format; float32: the one before
    session 18) for an A/B: every user reads ``attention_meta.KV_SCALE_DTYPE`` when it runs."""
    from anybit.layers import attention_meta
    attention_meta.KV_SCALE_DTYPE = getattr(torch, name)


def main(result_name: str = "kv_quality", title_note: str = ""):
    from anybit import LLM
    from anybit.default_model import default_model_path
    from tests.model_factory import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {arch: make_tiny_model(Path(tmp) / arch, arch=arch, hidden_size=128, num_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2 if arch != "mistral"
                                        else 1)
                  for arch in ("llama", "mistral", "qwen2")}
        models["default (trained, W4)"] = default_model_path()
        for name, path in models.items():
            ref = LLM(path, dtype="float32", device="cpu", kv_cache_dtype="float32", progress=False)
            for kv in ("int8", "int4"):
                row = measure(path, name, kv, ref)
                rows.append(row)
                print(row, flush=True)
    cols = list(rows[0])
    write_result(result_name, f"int8 / int4 KV cache{title_note} vs a float32 KV cache (CPU, torch backend)",
                 cols, rows,
                 [f"{len(PROMPTS)} prompts; logits over every prompt position; greedy {GEN} tokens; tiny "
                  "models have random weights (near-tied logits make greedy divergence likely), the default "
                  "model is the trained built-in one"])
    print_table(cols, rows)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale-dtype", choices=["float16", "float32"], default=None,
                    help="store the caches' scales as this type (default: KV_SCALE_DTYPE)")
    ap.add_argument("--name", default="kv_quality", help="result name")
    args = ap.parse_args()
    if args.scale_dtype:
        use_scale_dtype(args.scale_dtype)
    torch.manual_seed(0)
    main(args.name, f" ({args.scale_dtype} scales)" if args.scale_dtype else "")
