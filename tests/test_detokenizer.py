"""IncrementalDetokenizer: random token streams equal the full decode, multi-byte characters
split across byte-level tokens, stop strings across token boundaries, hold-back and flush."""

from __future__ import annotations

import random

import pytest
from test_tokenizer import make_bpe_folder

from anybit.detokenizer import IncrementalDetokenizer
from anybit.sampling_params import SamplingParams
from anybit.tokenizer import Tokenizer

SAMPLES = ["héllo 日本語 🙂 wörld", "The quick brown fox. ###", "emoji 🚀✨🙃 and 漢字かな",
           "def f(x):\n    return x  # ok", "ça va? Ελληνικά русский 한국어", "a<|user|>b</s>c"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_folder(make_bpe_folder(tmp_path_factory.mktemp("detok")))


def stream(tok, ids, params=None, prompt=(), chunks=None, rng=None):
    """Feed ids in chunks of 1..3 tokens; returns (detok, deltas, stop)."""
    d = IncrementalDetokenizer(tok, list(prompt), params or SamplingParams())
    deltas, stop, i = [], None, 0
    rng = rng or random.Random(0)
    while i < len(ids) and stop is None:
        n = chunks or rng.randint(1, 3)
        delta, stop = d.append(ids[i:i + n])
        assert not d.output_text.endswith("\ufffd") or stop is not None or "\ufffd" in tok.decode(ids)
        deltas.append(delta)
        assert "".join(deltas) == d.output_text
        i += n
    if stop is None:
        deltas.append(d.flush())
    assert "".join(deltas) == d.output_text
    return d, deltas, stop


@pytest.mark.parametrize("skip", [True, False])
def test_random_streams_equal_full_decode(tok, skip):
    rng = random.Random(1)
    params = SamplingParams(skip_special_tokens=skip)
    for trial in range(60):
        if trial % 2:  # arbitrary ids, incl. special tokens and lone UTF-8 bytes
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        else:  # real text, so characters are split across tokens
            text = " ".join(rng.choice(SAMPLES) for _ in range(rng.randint(1, 4)))
            ids = tok.encode(text, add_special_tokens=False)
        prompt = tok.encode(rng.choice(SAMPLES))
        d, _, _ = stream(tok, ids, params, prompt=prompt, rng=rng)
        assert d.output_text == tok.decode(ids, skip_special_tokens=skip), ids


def test_multibyte_held_back_until_complete(tok):
    ids = tok.encode("🙂", add_special_tokens=False)
    ids = [i for t in ids for i in ([t] if len(tok.decode([t])) else [t])]
    pieces = [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert any(p.endswith("\ufffd") for p in pieces[:-1]), "the emoji should span several tokens"
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    for k, t in enumerate(ids):
        delta, _ = d.append([t])
        assert "\ufffd" not in delta
        assert d.output_text == ("" if k < len(ids) - 1 else "🙂")
    # ended inside the character: flush releases the replacement char, like the full decode
    d = IncrementalDetokenizer(tok, [], SamplingParams())
    d.append(ids[:1])
    assert d.output_text == "" and d.flush() == tok.decode(ids[:1])


def test_stop_string_across_tokens(tok):
    text = "The quick brown fox. ### jumps"
    ids = tok.encode(text, add_special_tokens=False)
    for include in (False, True):
        params = SamplingParams(stop=["###", "zzz"], include_stop_str_in_output=include)
        d, deltas, stop = stream(tok, ids, params, chunks=1)
        assert stop == "###" and d.finished
        assert d.output_text == ("The quick brown fox. ###" if include else "The quick brown fox. ")
        assert d.append(ids[:2]) == ("", None)
        if not include:
            assert all("#" not in x for x in deltas)


def test_stop_prefix_is_held_then_released(tok):
    params = SamplingParams(stop=["fox jumps"])
    d = IncrementalDetokenizer(tok, [], params)
    out = ""
    for t in tok.encode("The quick brown fox", add_special_tokens=False):
        out += d.append([t])[0]
    assert out == "The quick brown " and d.output_text == out  # "fox" may start the stop string
    delta, stop = d.append(tok.encode(" ran", add_special_tokens=False))
    assert stop is None and out + delta == "The quick brown fox ran"
    d2 = IncrementalDetokenizer(tok, [], params)
    d2.append(tok.encode("brown fox j", add_special_tokens=False))
    assert d2.output_text == "brown " and d2.flush() == "fox j" and d2.output_text == "brown fox j"


def test_multibyte_stop_and_earliest_match(tok):
    ids = tok.encode("abc 日本語 🙂 def", add_special_tokens=False)
    d, _, stop = stream(tok, ids, SamplingParams(stop=["🙂", "本"]), chunks=1)
    assert stop == "本" and d.output_text == "abc 日"
    d, _, stop = stream(tok, ids, SamplingParams(stop=["語 🙂", "c 日本"]), chunks=len(ids))
    assert stop == "c 日本" and d.output_text == "ab"


def test_min_tokens_delays_stop(tok):
    ids = tok.encode("ab ab ab cd", add_special_tokens=False)
    d, _, stop = stream(tok, ids, SamplingParams(stop=["ab"], min_tokens=len(ids)), chunks=1)
    assert stop is None and d.output_text == "ab ab ab cd"
    d, _, stop = stream(tok, ids, SamplingParams(stop=["ab"]), chunks=1)
    assert stop == "ab" and d.output_text == ""


def test_random_stop_strings_match_reference(tok):
    rng = random.Random(7)
    for _ in range(40):
        text = " ".join(rng.choice(SAMPLES) for _ in range(3))
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        stops = []
        for _ in range(2):
            a = rng.randrange(len(full) - 1)
            stops.append(full[a:a + rng.randint(1, 5)])
        stops = [s for s in stops if s and "\ufffd" not in s] or ["§"]
        ref_text, ref_stop = full, None
        for t in range(1, len(ids) + 1):  # first prefix of the stream that contains a stop string
            prefix = tok.decode(ids[:t]).rstrip("\ufffd")
            found = [(prefix.find(s), k, s) for k, s in enumerate(stops) if s in prefix]
            if found:
                idx, _, ref_stop = min(found)
                ref_text = prefix[:idx]
                break
        d, _, stop = stream(tok, ids, SamplingParams(stop=stops), rng=rng)
        assert (d.output_text, stop) == (ref_text, ref_stop), (text, stops)


def test_decodes_a_small_window(tok):
    calls = []

    class Counting:
        all_special_ids = tok.all_special_ids

        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(SAMPLES) * 20, add_special_tokens=False)
    d = IncrementalDetokenizer(Counting(), tok.encode("prompt text"), SamplingParams())
    for t in ids:
        d.append([t])
    d.flush()
    assert d.output_text == tok.decode(ids)
    assert len(ids) > 500 and max(calls) <= 12, max(calls)


def test_prompt_context_keeps_leading_space(tok):
    # the first output token is decoded after the prompt's last tokens (same text as full decode)
    prompt = tok.encode("The quick")
    out = tok.encode(" brown fox", add_special_tokens=False)
    d, _, _ = stream(tok, out, prompt=prompt)
    assert d.output_text == " brown fox"
    # prompt ending inside a character: the output is decoded on its own
    emoji = tok.encode("🙂", add_special_tokens=False)
    d, _, _ = stream(tok, emoji[1:] + out, prompt=emoji[:1])
    assert d.output_text == tok.decode(emoji[1:] + out)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> Tokenizer:
    """A SentencePiece-style (Metaspace) BPE, whose decoder strips the leading space."""
    from test_tokenizer import CORPUS, SPECIALS
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = T(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    t.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                              show_progress=False))
    folder = tmp_path_factory.mktemp("sp")
    t.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    return Tokenizer.from_folder(folder)


def test_metaspace_decoder_keeps_spaces_between_steps(sp_tok):
    prompt = sp_tok.encode("The quick")
    out = sp_tok.encode(" brown fox jumps", add_special_tokens=False)
    assert sp_tok.decode(out) == "brown fox jumps"  # decoding alone strips the first space
    d, deltas, _ = stream(sp_tok, out, prompt=prompt, chunks=1)
    assert d.output_text == " brown fox jumps" and deltas[0] == " brown"
    full, head = sp_tok.decode(prompt + out), sp_tok.decode(prompt)
    assert d.output_text == full[len(head):]
    assert sp_tok.decode_token(out[0]) == " brown"


def test_stop_token_text_left_out(tok):
    ids = tok.encode("hello world", add_special_tokens=False) + [tok.eos_token_id]
    for include, expected in [(False, "hello world"), (True, "hello world</s>")]:
        d = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=False,
                                                           include_stop_str_in_output=include))
        d.append(ids[:-2])
        delta, stop = d.append(ids[-2:], stop_terminated=True)
        assert stop is None
        d.flush()
        assert d.output_text == expected
