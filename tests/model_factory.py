"""Tiny random-weight Hugging Face checkpoints for tests (no downloads).

``make_tiny_model(path, arch=...)`` writes config.json, model.safetensors (through
``transformers``' own ``save_pretrained``), tokenizer.json (a byte-level BPE trained here with
``tokenizers``) and tokenizer_config.json with a chat template. Returns the folder path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import os\nimport sys\nprint('hello world')\n",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Continuous batching mixes prefill chunks with decode tokens in one step.",
    "héllo wörld, 日本語のテキスト, emoji 🙂 and more ünïcödé text.",
    "class Request:\n    def __init__(self, request_id, prompt):\n        self.request_id = request_id\n",
    "for i in range(10):\n    total += i * i\n",
    "A language model predicts the next token given the previous ones.",
    "Quantization stores weights with fewer bits, for example 2, 3, 4 or 8 bits.",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]


def make_tokenizer(path: str | os.PathLike, vocab_size: int = 384) -> None:
    """Train a byte-level BPE on CORPUS and save tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


ARCH_DEFAULTS = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  tie_word_embeddings=False),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=24,
                    tie_word_embeddings=False),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  use_sliding_window=False),
}


def make_tiny_model(path: str | os.PathLike, arch: str = "llama", hidden_size: int = 64,
                    num_layers: int = 2, intermediate_size: int = 128, seed: int = 0,
                    dtype: str = "float32", max_position_embeddings: int = 512, **overrides) -> str:
    """Write a tiny random HF checkpoint of ``arch`` (llama | mistral | qwen2) into ``path``."""
    import torch
    import transformers

    path = Path(path)
    make_tokenizer(path)
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, max_position_embeddings=max_position_embeddings,
                  bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, rope_theta=10000.0)
    kwargs.update(ARCH_DEFAULTS[arch])
    kwargs.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # larger random weights than HF's init so logits are not all flat
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)
