"""Tokenizer: encode/decode and chat templates against transformers' AutoTokenizer on a tiny
byte-level BPE trained here (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from anybit.tokenizer import Tokenizer

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, 日本語のテキスト 🙂 and ünïcödé ça va? Ελληνικά, русский текст.",
    "def main(argv):\n    return sum(int(x) for x in argv)  # ok\n",
    "Paged attention keeps keys and values in blocks of sixteen tokens.",
    "Emoji run: 🙂🙃😀🚀✨ and CJK 漢字かなカナ 한국어.",
    "Numbers 0 1 2 3 42 3.14159 -7 1e-5 and symbols !@#$%^&*()[]{}<>",
    "    indented\ttabs\tand\r\nwindows newlines",
]
CORPUS = [f"{i} {line}" for i in range(40) for line in LINES]  # a few hundred lines
SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}"
    "{% endif %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] | trim + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if tools %}{{ 'Tools: ' + tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEXTS = ["hello world", "héllo 日本語 🙂", "", " leading space", "<|user|>hi<|assistant|>", "</s> eos",
         "tabs\tand\nnewlines\n\n", "🙃🙃🙃 unseen ✓ ∑ ǅ", *LINES]


def make_bpe_folder(path: Path, vocab_size: int = 512, template=TEMPLATE, bos_post: bool = True,
                    config_extra: dict | None = None) -> Path:
    """Train a byte-level BPE on CORPUS; save tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos_post:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
           "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True, "__type": "AddedToken"},
           "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": bos_post, "model_max_length": 2048}
    if template is not None:
        cfg["chat_template"] = template
    cfg.update(config_extra or {})
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_bpe_folder(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pair(folder):
    from transformers import AutoTokenizer

    return Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("add_special", [True, False])
def test_encode_matches_transformers(pair, add_special):
    ours, hf = pair
    for text in TEXTS:
        expected = hf(text, add_special_tokens=add_special)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special) == expected, text
    assert ours.encode_batch(TEXTS[:3]) == [hf(t)["input_ids"] for t in TEXTS[:3]]
    assert ours.encode("hi")[0] == ours.bos_token_id  # BOS once, from the post-processor
    assert ours.encode("hi")[1] != ours.bos_token_id


def test_no_bos_post_processor_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    d = make_bpe_folder(tmp_path, bos_post=False)
    ours, hf = Tokenizer.from_folder(d), AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(pair, skip):
    ours, hf = pair
    rng = random.Random(0)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for _ in range(50):  # random ids, including special ones and broken UTF-8
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id and ours.eos_token_id == hf.eos_token_id
    assert ours.eos_token_ids == {hf.eos_token_id}
    assert ours.pad_token_id == hf.pad_token_id
    assert set(hf.all_special_ids) <= ours.all_special_ids
    assert ours.convert_ids_to_tokens([ours.bos_token_id, 300]) == hf.convert_ids_to_tokens(
        [ours.bos_token_id, 300])
    assert ours.convert_tokens_to_ids("</s>") == ours.eos_token_id
    assert ours.decode_token(ours.encode("hello", add_special_tokens=False)[0]) in "hello"


MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "héllo 🙂"},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}],
]


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(pair, gen):
    ours, hf = pair
    for msgs in MESSAGES:
        expected = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == expected
    tools = [{"type": "function", "function": {"name": "f", "description": "ünï <b>", "parameters": {}}}]
    expected = hf.apply_chat_template(MESSAGES[0], tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(MESSAGES[0], tools=tools) == expected


def test_chat_template_text_parts_and_errors(pair, tmp_path):
    ours, _ = pair
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "a\nb" in ours.apply_chat_template(parts)
    with pytest.raises(ValueError, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="rendering failed"):
        ours.apply_chat_template(MESSAGES[0], chat_template="{{ 1 // 0 }}")
    with pytest.raises(ValueError, match="unsafe"):  # sandboxed: no access to python internals
        ours.apply_chat_template(MESSAGES[0], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="unsafe"):  # immutable: templates cannot mutate inputs
        ours.apply_chat_template(MESSAGES[0], chat_template="{{ messages.append(1) }}")
    assert ours.apply_chat_template(MESSAGES[0], chat_template="{% set d = dict(a=1) %}{{ d.a }}") == "1"
    with pytest.raises(ValueError, match="invalid Jinja"):
        ours.apply_chat_template(MESSAGES[0], chat_template="{% for %}")
    for bad, where in [([], "messages"), ([{"content": "x"}], "messages\\[0\\].role"),
                       ([{"role": "user"}], "messages\\[0\\].content"),
                       ([{"role": "user", "content": 3}], "messages\\[0\\].content"),
                       (["hi"], "messages\\[0\\]")]:
        with pytest.raises(ValueError, match=where):
            ours.apply_chat_template(bad)
    no_template = Tokenizer.from_folder(make_bpe_folder(tmp_path / "plain", template=None))
    assert no_template.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template(MESSAGES[0])
    assert no_template.apply_chat_template(MESSAGES[0], chat_template="{{ messages[0].content }}") == "hi"


def test_named_templates_jinja_file_and_eos_lists(tmp_path):
    named = [{"name": "default", "template": "D{{ messages[0].content }}"},
             {"name": "tool_use", "template": "T{{ tools | length if tools else 0 }}"}]
    d = make_bpe_folder(tmp_path / "named", template=named)
    tok = Tokenizer.from_folder(d)
    assert tok.apply_chat_template(MESSAGES[0]) == "Dhi"
    assert tok.apply_chat_template(MESSAGES[0], tools=[{"a": 1}]) == "T1"
    assert tok.apply_chat_template(MESSAGES[0], chat_template="tool_use") == "T0"

    (d / "chat_template.jinja").write_text("J{{ messages | length }}{{ strftime_now('%Y') | length }}")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_folder(d)
    assert tok.apply_chat_template(MESSAGES[1]) == "J44"
    assert tok.eos_token_ids == {2, 5}

    (d / "generation_config.json").unlink()
    (d / "config.json").write_text(json.dumps({"eos_token_id": 6}))
    assert Tokenizer.from_folder(d).eos_token_ids == {2, 6}


def test_missing_and_bad_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nope")
    d = make_bpe_folder(tmp_path / "bad")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_folder(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": 5}))
    with pytest.raises(ValueError, match="bos_token"):
        Tokenizer.from_folder(d)
