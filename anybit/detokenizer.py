"""Incremental detokenizer: generated token ids -> text deltas, with stop strings.

In: the request's tokenizer, prompt token ids and `SamplingParams` (stop, skip_special_tokens,
include_stop_str_in_output, min_tokens); then the new token ids of each step. Out: the text
delta of each step and the stop string that matched, if any. Called by the engine (one
instance per completion) after every step; `flush()` when the request ends for another reason.

How (the prefix/read offsets of vLLM and TGI): only a window of recent tokens is decoded each
step. `ids[prefix:read]` were already turned into text; the step decodes `ids[prefix:]` and
`ids[prefix:read]` and emits the difference, unless the window ends in U+FFFD (an unfinished
multi-byte UTF-8 character split across byte-level BPE tokens), in which case the tokens stay
pending until the character is complete. Decoding with a little left context (the last prompt
tokens at first) keeps the leading spaces that SentencePiece-style decoders strip at the start
of a sequence. For byte-level BPE the sum of the deltas is exactly
`tokenizer.decode(output_ids)` (after `flush()`), up to the stop-string truncation.

Stop strings may span token boundaries: the search covers the new text plus the
`len(stop) - 1` characters before it, and any tail of the text that is a prefix of a stop string
is held back (not emitted) until it is known not to start a stop string, so a matched stop string
never leaks into the output (unless include_stop_str_in_output).
"""

from __future__ import annotations

from anybit.sampling_params import SamplingParams

CONTEXT_TOKENS = 5   # prompt tokens used as left context for the first output tokens
TRIM_AFTER = 256     # drop decoded ids in front of the window once it has moved this far

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text, step by step (one instance per completion).

    `append(ids) -> (delta_text, stop_string | None)`; `output_text` is everything emitted so
    far; `flush() -> str` releases held-back text at the end. After a stop string matched (or
    after flush) further appends return ("", None)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self._hold_stops = bool(self.stop) and not params.include_stop_str_in_output
        context = list(prompt_token_ids or [])[-CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # the prompt ends inside a character: decode the output on its own
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""        # decoded text of the output (stop-truncated once matched)
        self._emitted = 0      # characters of _text handed out so far
        self.num_output_tokens = 0
        self.finished = False
        self.stop_reason: str | None = None

    # ---- public ---------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        """The text emitted so far (sum of all deltas)."""
        return self._text[:self._emitted]

    def append(self, new_token_ids: list[int], stop_terminated: bool = False) -> tuple[str, str | None]:
        """Add this step's tokens; returns (new text to emit, matched stop string or None).

        Tokens are processed one at a time; tokens after a matched stop string are ignored.
        `stop_terminated=True` says the last token is the EOS / a stop_token_id that finished the
        request: its text is left out unless include_stop_str_in_output (as vLLM; only visible
        with skip_special_tokens=False or for non-special stop tokens). Call flush() after it."""
        if self.finished:
            return "", None
        start = self._emitted
        if stop_terminated and new_token_ids and not self.params.include_stop_str_in_output:
            new_token_ids = list(new_token_ids)[:-1]
            self.num_output_tokens += 1
        for tid in new_token_ids:
            self._ids.append(int(tid))
            self.num_output_tokens += 1
            delta = self._decode_step(final=False)
            if not delta:
                continue
            if self._add_text(delta):
                self._maybe_trim()
                return self._release_all(start), self.stop_reason
        self._maybe_trim()
        self._emitted = max(self._emitted, len(self._text) - self._held_len())
        return self._text[start:self._emitted], None

    def flush(self) -> str:
        """Release everything still held back (pending bytes decoded as U+FFFD, stop-string
        prefixes); call when the request finished for another reason than a stop string."""
        if self.finished:
            return ""
        start = self._emitted
        delta = self._decode_step(final=True)
        if delta:
            self._add_text(delta)
        return self._release_all(start)

    # ---- internals --------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_step(self, final: bool) -> str:
        """Text added by the pending tokens ids[read:], or "" while they end inside a char."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
            delta = new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        if new_text == prefix_text and not final and self._all_skipped(self._ids[self._read_offset:]):
            self._read_offset = len(self._ids)  # only skipped special tokens: nothing pending
        return ""

    def _all_skipped(self, ids: list[int]) -> bool:
        special = getattr(self.tokenizer, "all_special_ids", ())
        return self.skip_special_tokens and all(i in special for i in ids)

    def _add_text(self, delta: str) -> bool:
        """Append decoded text and look for a stop string; True (and truncate) on a match."""
        prev_len = len(self._text)
        self._text += delta
        if not self.stop or self.num_output_tokens < self.params.min_tokens:
            return False
        best: tuple[int, str] | None = None
        for s in self.stop:
            # only matches that end inside the new text (earlier ones were checked before)
            idx = self._text.find(s, max(0, prev_len - len(s) + 1))
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        idx, s = best
        end = idx + len(s) if self.params.include_stop_str_in_output else idx
        self._text = self._text[:max(end, self._emitted)]
        self.stop_reason = s
        return True

    def _held_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        if not self._hold_stops:
            return 0
        text = self._text
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return min(best, len(text) - self._emitted)

    def _release_all(self, start: int) -> str:
        self._emitted = len(self._text)
        self.finished = True
        return self._text[start:]

    def _maybe_trim(self) -> None:
        if self._prefix_offset > TRIM_AFTER:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
