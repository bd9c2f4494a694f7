"""The built-in default model shipped inside the package (``anybit/default_model/``).

``default_model_path()`` is what ``anybit generate|chat|serve`` and ``LLM()`` use when no model
is given. The folder holds a ~29M-parameter Llama trained on Python's standard library by
``scripts/train_default_model.py`` and quantized with anybit's own quantizer; ``heldout.json``
records the train/held-out split and the measured perplexities, ``heldout_sample.json`` a small
held-out text sample.

The perplexity protocol shared by the training script, ``scripts/eval_perplexity.py`` and the
tests: each document is tokenized without special tokens, cut into chunks of ``window - 1``
tokens, and each chunk is scored after a ``<|bos|>`` token (the BOS itself is not scored).
"""

from __future__ import annotations

import json
import os

_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
_REQUIRED = ("config.json", "tokenizer.json")


def default_model_path() -> str:
    """Absolute path of the shipped default model folder; a clear error if it is missing."""
    missing = [f for f in _REQUIRED if not os.path.isfile(os.path.join(_FOLDER, f))]
    if missing:
        raise FileNotFoundError(
            f"the built-in default model is missing ({', '.join(missing)} not found in {_FOLDER}); "
            "the package was installed without its data files: reinstall anybit, or pass a model "
            "folder explicitly (e.g. `anybit generate PATH/TO/MODEL`)"
        )
    return _FOLDER


def load_heldout_info(model_path: str | None = None) -> dict:
    """``heldout.json`` of a model folder (default: the shipped model)."""
    with open(os.path.join(model_path or default_model_path(), "heldout.json")) as f:
        return json.load(f)


def load_heldout_sample(model_path: str | None = None) -> list[str]:
    """Texts of the held-out sample documents (``heldout_sample.json``)."""
    with open(os.path.join(model_path or default_model_path(), "heldout_sample.json")) as f:
        return [d["text"] for d in json.load(f)["documents"]]


def perplexity_windows(docs: list[list[int]], bos_id: int, window: int) -> list[list[int]]:
    """Token lists to score: each document cut into ``window - 1``-token chunks behind a BOS."""
    if window < 2:
        raise ValueError(f"window: got {window}, allowed: >= 2")
    out = []
    for d in docs:
        for i in range(0, len(d), window - 1):
            out.append([bos_id] + list(d[i : i + window - 1]))
    return out


def sample_windows(tokenizer, model_path: str | None = None, max_tokens: int = 3000,
                   window: int = 1023) -> list[list[int]]:
    """Windows covering the first ``max_tokens`` scored tokens of the held-out sample."""
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in load_heldout_sample(model_path)]
    out, n = [], 0
    for w in perplexity_windows(docs, tokenizer.bos_token_id, window):
        take = min(len(w) - 1, max_tokens - n)
        if take <= 0:
            break
        out.append(w[: take + 1])
        n += take
    return out


def score_nll(llm, windows: list[list[int]]) -> tuple[float, int]:
    """Mean NLL (nats/token) of every token after the first of each window, scored by an
    ``anybit.LLM`` through ``prompt_logprobs``; returns ``(mean_nll, num_tokens)``.

    The engine should be built with ``enable_chunked_prefill=False`` and
    ``max_num_batched_tokens`` >= the longest window so no prompt is split into chunks.
    """
    from anybit.sampling_params import SamplingParams

    outs = llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0))
    tot, n = 0.0, 0
    for o, w in zip(outs, windows):
        lps = o.prompt_logprobs
        if lps is None or len(lps) != len(w) or any(d is None for d in lps[1:]):
            got = None if lps is None else (len(lps), sum(d is None for d in lps))
            raise RuntimeError(f"prompt_logprobs: expected {len(w)} entries (only the first None), got {got}")
        for tid, d in zip(w[1:], lps[1:]):
            tot -= d[tid]
            n += 1
    return tot / max(n, 1), n
