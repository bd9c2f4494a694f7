"""Tokenizer of a Hugging Face model folder, through the `tokenizers` library (no transformers).

In: a folder with tokenizer.json (required), tokenizer_config.json (special tokens,
add_bos_token/add_eos_token, chat_template), optionally chat_template.jinja,
generation_config.json and config.json (eos_token_id, an int or a list).
Out: `Tokenizer` with encode/decode, special-token ids and `apply_chat_template`.
Called by the loader/engine (`engine.tokenizer`), the detokenizer and the server.

`encode` matches transformers' `AutoTokenizer(...)(text)["input_ids"]`: the post-processor
stored in tokenizer.json adds BOS (Llama); nothing is added on top of it (transformers 5 does the
same and ignores add_bos_token for tokenizer.json-backed tokenizers).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                      "mask_token")


def _token_content(value: Any, field: str, file: Path) -> str | None:
    """A special token given as a string, an AddedToken dict ({"content": ...}) or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{file}: {field} must be a string, null or an AddedToken dict with 'content', "
                     f"got {value!r}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _eos_ids_from(value: Any) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


class Tokenizer:
    """Text <-> token ids for one model, plus its special tokens and chat template.

    Attributes: `vocab_size` (incl. added tokens), `bos_token_id`, `eos_token_id` (the
    tokenizer's own EOS), `eos_token_ids` (set: EOS plus generation_config/config eos ids),
    `pad_token_id`, `all_special_ids` (set), `special_tokens` (name -> string), `chat_template`.
    """

    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None,
                 eos_token_ids: set[int] | None = None, chat_template: str | dict | None = None,
                 name: str = "<memory>") -> None:
        config = config or {}
        self._tok = tokenizer
        self.name = name
        cfg_file = Path(name) / "tokenizer_config.json"
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            content = _token_content(config.get(key), key, cfg_file)
            if content is not None:
                self.special_tokens[key] = content
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token"))
        self.unk_token_id = self.token_to_id(self.special_tokens.get("unk_token"))
        self.eos_token_ids: set[int] = set(eos_token_ids or ())
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)

        special = {i for i in (self.token_to_id(t) for t in self.special_tokens.values()) if i is not None}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        for t in extra if isinstance(extra, list) else []:
            tid = self.token_to_id(_token_content(t, "additional_special_tokens", cfg_file))
            if tid is not None:
                special.add(tid)
        for tid, tok in tokenizer.get_added_tokens_decoder().items():
            if tok.special:
                special.add(tid)
        self.all_special_ids: set[int] = special
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.model_max_length = config.get("model_max_length")

        # BOS/EOS: the post-processor stored in tokenizer.json decides (Llama's TemplateProcessing adds
        # BOS). transformers (5.x) ignores add_bos_token/add_eos_token for tokenizer.json-backed
        # tokenizers, and so do we; we only record them.
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))

        self._token_text_cache: dict[int, str] = {}
        self.chat_template = self._select_template(chat_template)
        self._named_templates = chat_template if isinstance(chat_template, dict) else {}

    # ---- loading ------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation/config
        eos ids) from a model folder. Raises FileNotFoundError naming tokenizer.json if absent."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            present = [n for n in ("tokenizer.model", "vocab.json", "merges.txt") if (folder / n).exists()]
            hint = (f" (found {', '.join(present)}; only the fast tokenizer format tokenizer.json is "
                    "supported, convert it with transformers' AutoTokenizer(...).save_pretrained)"
                    if present else "")
            raise FileNotFoundError(f"{tok_file} not found{hint}")
        try:
            hf_tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ValueError(f"{tok_file}: cannot be parsed by the tokenizers library ({e})") from e
        config = _read_json(folder / "tokenizer_config.json")

        template: Any = config.get("chat_template")
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            template = _read_json(folder / "chat_template.json").get("chat_template", template)
        if isinstance(template, list):
            named = {}
            for entry in template:
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                        and isinstance(entry.get("template"), str)):
                    raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template list entries "
                                     f"must be {{'name': str, 'template': str}}, got {entry!r}")
                named[entry["name"]] = entry["template"]
            template = named
        elif template is not None and not isinstance(template, str):
            raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list "
                             f"of {{name, template}}, got {type(template).__name__}")

        eos: set[int] = set()
        gen = _read_json(folder / "generation_config.json")
        eos |= _eos_ids_from(gen.get("eos_token_id"))
        if not eos:
            model_cfg = _read_json(folder / "config.json")
            eos |= _eos_ids_from(model_cfg.get("eos_token_id"))
            eos |= _eos_ids_from((model_cfg.get("text_config") or {}).get("eos_token_id"))
        return cls(hf_tok, config, eos_token_ids=eos, chat_template=template, name=str(folder))

    @staticmethod
    def _select_template(template: str | dict | None) -> str | None:
        if isinstance(template, dict):
            return template.get("default") or (next(iter(template.values())) if template else None)
        return template

    # ---- ids <-> text ---------------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS/EOS as transformers would add them."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (all_special_ids and added special tokens) dropped
        when skip_special_tokens."""
        ids = list(ids)
        if skip_special_tokens and self.all_special_ids:
            special = self.all_special_ids
            ids = [i for i in ids if i not in special]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int] | int) -> list[str | None] | str | None:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: list[str] | str) -> list[int | None] | int | None:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def decode_token(self, token_id: int) -> str:
        """Text of one token as shown in logprobs (U+FFFD for a partial UTF-8 byte). Keeps the
        leading space of SentencePiece-style tokens ("\u2581world" -> " world"), which decoding
        the token alone would strip. Cached per id."""
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            raw = self._tok.id_to_token(token_id)
            if raw and raw.startswith("\u2581") and not text.startswith(" "):
                text = " " + text
            self._token_text_cache[token_id] = text
        return text

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, chat_template: str | None = None,
                            **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template
        in a sandboxed Jinja environment (as transformers does). `chat_template` may be a template
        string or the name of one of the model's named templates. Raises ValueError when the model
        has no chat template or a message is malformed."""
        template = self.chat_template
        if chat_template is not None:
            template = self._named_templates.get(chat_template, chat_template)
        elif tools and "tool_use" in self._named_templates:
            template = self._named_templates["tool_use"]
        if not template:
            raise ValueError(f"chat_template: the tokenizer of {self.name} has no chat template "
                             "(tokenizer_config.json has no 'chat_template' and there is no "
                             "chat_template.jinja); pass one explicitly")
        variables = dict(self.special_tokens)
        variables.update(kwargs)
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, **variables)


# ---- chat template rendering (mirrors transformers.utils.chat_template_utils) -------------------


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson (which HTML-escapes) with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_dict(*args, **kwargs) -> dict:
    return dict(*args, **kwargs)


def _jinja_version_ok() -> bool:
    parts = []
    for p in jinja2.__version__.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= (3, 1, 6)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    if not _jinja_version_ok():  # older versions have known sandbox escapes (templates are untrusted)
        raise ImportError(f"chat templates need jinja2 >= 3.1.6, found {jinja2.__version__}; "
                          "upgrade with `pip install -U jinja2`")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _template_dict
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: invalid Jinja syntax at line {e.lineno}: {e.message}") from e


def _check_messages(messages: Any) -> list[dict]:
    """Validate the message list; text-part lists ([{"type": "text", "text": ...}]) are joined."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(
                f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role: missing or not a string; allowed e.g. 'system', "
                             "'user', 'assistant', 'tool'")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}].content: missing (allowed: a string, a list of text parts, "
                             "or null for an assistant message with tool_calls)")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}].content: null is only allowed with tool_calls")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}].content[{j}]: only text parts "
                                     "{'type': 'text', 'text': str} are supported")
                texts.append(part["text"])
            m = {**m, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: expected a string or a list of text parts, "
                             f"got {type(content).__name__}")
        out.append(m)
    return out


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         tools: list[dict] | None = None, **variables) -> str:
    """Render a chat template like transformers' apply_chat_template(tokenize=False).

    Template errors (including raise_exception(...) in the template) become ValueError."""
    messages = _check_messages(messages)
    compiled = _compile_template(template)
    try:
        return compiled.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               **variables)
    except Exception as e:  # raise_exception(...), SecurityError, or TypeError/KeyError in the template
        raise ValueError(f"chat_template: rendering failed: {type(e).__name__}: {e}") from e
