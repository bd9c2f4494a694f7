"""Check that a folder written by train_default_model.py loads in ``transformers`` and that HF's
``LlamaForCausalLM`` computes the same logits and loss as the training-time model (float32, CPU).

Also checks the tokenizer: ``AutoTokenizer`` adds BOS and renders the chat template.

    python scripts/train_check_hf.py artifacts/default-model-bf16 [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_default_model import eval_windows  # noqa: E402
from train_model import TinyLlama, TinyLlamaConfig  # noqa: E402


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(a.folder, torch_dtype=torch.float32).eval()
    hcfg = _load(os.path.join(a.folder, "config.json"))
    fields = TinyLlamaConfig.__dataclass_fields__
    cfg = TinyLlamaConfig(**{k: v for k, v in hcfg.items() if k in fields})
    mine = TinyLlama(cfg).eval()
    sd = {k: v.float() for k, v in load_file(os.path.join(a.folder, "model.safetensors")).items()}
    mine.load_state_dict(sd)
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight), "lm_head not tied"

    tok = AutoTokenizer.from_pretrained(a.folder)
    ids = tok("def fibonacci(n):")["input_ids"]
    assert ids[0] == tok.bos_token_id, f"BOS not added: {ids}"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    print("chat template:", repr(chat))

    docs = _load(os.path.join(a.folder, "heldout_sample.json"))["documents"]
    enc = [tok(d["text"], add_special_tokens=False)["input_ids"] for d in docs]
    ws = [w for w in eval_windows(enc, tok.bos_token_id, a.seq_len) if len(w) == a.seq_len][: a.windows]
    x = torch.tensor(ws)
    y = torch.full_like(x, -100)
    y[:, :-1] = x[:, 1:]
    with torch.no_grad():
        l_hf = hf(x).logits
        l_me = mine(x)
        loss_hf = torch.nn.functional.cross_entropy(l_hf.flatten(0, 1), y.flatten(), ignore_index=-100)
        loss_me = mine.loss(x, y)
    diff = (l_hf - l_me).abs().max().item()
    print(f"max |logit diff| {diff:.2e}; loss HF {loss_hf.item():.6f} vs training model {loss_me.item():.6f}")
    assert diff < 1e-3 and abs(loss_hf.item() - loss_me.item()) < 1e-4, "HF and training model disagree"
    print("OK")


if __name__ == "__main__":
    main()
