"""Corpus, train/held-out split, BPE tokenizer and chat examples for the default model.

The corpus is the ``.py`` files of a Python standard library (``site-packages`` excluded), read
either from a directory (default: this interpreter's ``sysconfig`` stdlib) or from a
``.tar.xz`` made by ``scripts/train_make_corpus.py`` (so the GPU machine trains on exactly the
files of the machine that made the archive). Files are sorted by relative path; the split is by
file with a fixed rule on the SHA-1 of the relative path (see ``split_bucket``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import sysconfig
import tarfile

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPLIT_RULE = (
    "bucket = int(sha1(relative_path.encode()).hexdigest()[:8], 16) % 20; "
    "bucket 0 -> heldout (test, never trained on or used for selection), "
    "bucket 1 -> validation (checkpoint selection), others -> train"
)
MAX_FILE_BYTES = 400_000  # skip a few huge data-like files (e.g. pydoc_data/topics.py)


def split_bucket(rel_path: str) -> str:
    """'heldout' | 'val' | 'train' for a corpus file (rule: SPLIT_RULE)."""
    b = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16) % 20
    return "heldout" if b == 0 else "val" if b == 1 else "train"


def _keep(rel: str, size: int) -> bool:
    return rel.endswith(".py") and "site-packages" not in rel and size <= MAX_FILE_BYTES


def read_corpus(source: str | None) -> tuple[list[tuple[str, str]], dict]:
    """Return ``([(relative_path, text)] sorted by path, info)``; undecodable files are skipped."""
    files: list[tuple[str, bytes]] = []
    info: dict = {}
    if source is None:
        source = sysconfig.get_paths()["stdlib"]
    if os.path.isdir(source):
        import sys

        info = {"source": "directory", "python_version": sys.version.split()[0]}
        for dp, dn, fn in os.walk(source):
            dn[:] = sorted(d for d in dn if d not in ("site-packages", "__pycache__"))
            for f in fn:
                p = os.path.join(dp, f)
                rel = os.path.relpath(p, source).replace(os.sep, "/")
                if _keep(rel, os.path.getsize(p)):
                    with open(p, "rb") as fh:
                        files.append((rel, fh.read()))
    else:
        with tarfile.open(source, "r:*") as tar:
            for m in tar.getmembers():
                if m.name == "CORPUS_INFO.json":
                    info = json.loads(tar.extractfile(m).read())
                elif m.isfile() and _keep(m.name, m.size):
                    files.append((m.name, tar.extractfile(m).read()))
        info["source"] = "archive " + os.path.basename(source)
    out = []
    for rel, raw in sorted(files):
        try:
            out.append((rel, raw.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    info["num_files"] = len(out)
    info["bytes"] = sum(len(t.encode()) for _, t in out)
    return out, info


def split_corpus(files: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    parts: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "heldout": []}
    for rel, text in files:
        parts[split_bucket(rel)].append((rel, text))
    return parts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with SPECIAL_TOKENS (ids 0..4) and a BOS-adding post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B:1", special_tokens=[("<|bos|>", bos)]
    )
    return tok


def tokenizer_config(max_len: int) -> dict:
    """``tokenizer_config.json`` for ``PreTrainedTokenizerFast`` (and anybit's tokenizer)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }


def chat_examples(files: list[tuple[str, str]], limit_chars: int, seed: int = 0) -> list[str]:
    """ChatML examples made from documented public functions: the user asks for the function by
    its signature and the first docstring line; the assistant answers with the source code.

    Candidates come from all files; a seeded sample of them fills ``limit_chars``. Gives
    ``anybit chat`` something sensible to do and teaches the ``<|im_end|>`` stop token.
    """
    cands = []
    for _, text in files:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            doc = ast.get_docstring(node)
            if not doc or not doc.strip() or node.end_lineno - node.lineno > 40:
                continue
            src = _dedent(lines[node.lineno - 1 : node.end_lineno], node.col_offset)
            if src is None or "\t" in src:
                continue
            first = doc.strip().splitlines()[0].strip()
            args = ", ".join(a.arg for a in node.args.args)
            user = f"Write a Python function `{node.name}({args})`: {first}"
            cands.append(
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
                f"```python\n{src}\n```<|im_end|>\n"
            )
    random.Random(seed).shuffle(cands)
    out, total = [], 0
    for ex in cands:
        if total >= limit_chars:
            break
        out.append(ex)
        total += len(ex)
    return out


def _dedent(lines: list[str], col: int) -> str | None:
    """Remove ``col`` leading spaces from every line (None if a line has less indentation)."""
    out = []
    for ln in lines:
        if ln.strip() and ln[:col].strip():
            return None
        out.append(ln[col:])
    return "\n".join(out)


def heldout_sample(heldout: list[tuple[str, str]], max_bytes: int) -> list[dict]:
    """Whole held-out files (in path order, files over 16 KB skipped) up to ``max_bytes``."""
    docs, total = [], 0
    for rel, text in heldout:
        n = len(text.encode())
        if n > 16_000 or n < 500 or total + n > max_bytes:
            continue
        docs.append({"path": rel, "text": text})
        total += n
    return docs
