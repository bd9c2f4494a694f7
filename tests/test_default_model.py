"""The built-in default model (anybit/default_model/): it ships, it is small, its held-out
perplexity on CPU is within the bound recorded when it was installed, and ``anybit generate``
with no model argument continues ``def fibonacci(n):`` with Python.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys

import pytest

from anybit.default_model import (
    default_model_path,
    load_heldout_info,
    perplexity_windows,
    sample_windows,
    score_nll,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_folder_ships_and_is_small():
    path = default_model_path()
    names = set(os.listdir(path))
    required = ("config.json", "tokenizer.json", "tokenizer_config.json", "heldout.json",
                "heldout_sample.json")
    for f in required:
        assert f in names, f"{f} missing from {path}"
    assert any(n.endswith(".safetensors") for n in names)
    total = sum(os.path.getsize(os.path.join(path, n)) for n in names)
    assert total <= 25e6, f"default model folder is {total / 1e6:.1f} MB > 25 MB"
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" in cfg
    info = load_heldout_info()
    assert info["heldout_files"] and "split_rule" in info and info["corpus"]["python_version"]


def test_missing_folder_gives_clear_error(monkeypatch, tmp_path):
    import anybit.default_model as dm

    monkeypatch.setattr(dm, "_FOLDER", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="default model is missing"):
        dm.default_model_path()


def test_perplexity_windows_protocol():
    ws = perplexity_windows([[5, 6, 7, 8, 9], [3]], bos_id=0, window=3)
    assert ws == [[0, 5, 6], [0, 7, 8], [0, 9], [0, 3]]


def test_heldout_perplexity_within_recorded_bound():
    from anybit import LLM

    info = load_heldout_info()["shipped"]
    proto = info["test_protocol"]
    llm = LLM(None, progress=False, device="cpu", enable_chunked_prefill=False, max_num_batched_tokens=4096)
    windows = sample_windows(llm.tokenizer, None, proto["tokens"], proto["window"])
    nll, n = score_nll(llm, windows)
    ppl = math.exp(nll)
    assert n == proto["tokens"]
    assert ppl <= info["test_ppl_bound"], f"held-out ppl {ppl:.3f} > recorded bound {info['test_ppl_bound']}"
    # a trained model: far better than uniform over the vocabulary (8192) and than a unigram model
    assert ppl < 20, ppl


def test_generate_without_model_continues_fibonacci():
    prompt = "def fibonacci(n):"
    r = subprocess.run(
        [sys.executable, "-m", "anybit.cli", "generate", "--prompt", prompt, "--max-tokens", "40",
         "--json", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = json.loads(r.stdout.strip().splitlines()[-1])["text"]
    lines = text.split("\n")
    assert lines[0].strip() == "" and len(lines) > 1, f"no new line after the signature: {text!r}"
    assert lines[1].startswith((" ", "\t")) and lines[1].strip(), f"body not indented: {text!r}"
    # the function body: indented lines up to the first line back at column 0
    body = []
    for ln in lines[1:]:
        if ln.strip() and not ln.startswith((" ", "\t")):
            break
        body.append(ln)
    code = prompt + "\n" + "\n".join(body)
    while body:  # the last line may be cut by max_tokens: drop lines from the end until it parses
        try:
            ast.parse(code)
            break
        except SyntaxError:
            body.pop()
            code = prompt + "\n" + "\n".join(body)
    assert body, f"no parsable function body in {text!r}"
    tree = ast.parse(code)
    assert isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].body


def test_training_script_tiny_loads_in_transformers(tmp_path):
    """scripts/train_default_model.py --tiny on a small corpus: the saved folder loads in
    transformers' LlamaForCausalLM with the same logits as the training-time model."""
    pytest.importorskip("transformers")
    import torch

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import train_default_model
    from train_model import TinyLlama, TinyLlamaConfig

    corpus = tmp_path / "lib"
    corpus.mkdir()
    from anybit.default_model import load_heldout_sample

    text = "\n".join(load_heldout_sample())
    for i in range(60):  # 60 files of ~700 bytes cut from the shipped held-out sample
        (corpus / f"mod_{i:02d}.py").write_text(text[i * 700:(i + 1) * 700])
    out = tmp_path / "model"
    train_default_model.main(["--tiny", "--corpus", str(corpus), "--out", str(out), "--steps", "4"])
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.json"):
        assert (out / f).is_file(), f

    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with open(out / "config.json") as f:
        hcfg = json.load(f)
    cfg = TinyLlamaConfig(**{k: v for k, v in hcfg.items() if k in TinyLlamaConfig.__dataclass_fields__})
    mine = TinyLlama(cfg).eval()
    mine.load_state_dict({k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()})
    x = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, mine(x), rtol=1e-4, atol=1e-4)
