"""Terminal chat: read user turns from a text stream, stream the model's reply as it is generated.

In: an engine with the ``LLMEngine`` API (``add_request`` / ``step`` / ``tokenizer``), sampling
settings, an input stream (stdin, a pipe in tests) and an output stream. Out: the replies,
written token by token; the conversation history is kept and re-rendered with the model's
chat template on every turn. ``/exit`` (or ``/quit``, or end of input) quits, ``/reset`` clears
the history. Called by ``server/cli.py`` (``anybit chat MODEL``).
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, TextIO

from anybit.sampling_params import SamplingParams

EXIT_COMMANDS = ("/exit", "/quit")
HELP = "Type a message and press Enter. /reset clears the history, /exit quits."


class TerminalChat:
    """One conversation with the model over a pair of text streams."""

    def __init__(self, engine: Any, params: SamplingParams, system: str | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None, prompt: str | None = None):
        self.engine = engine
        self.params = params
        self.system = system
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        interactive = hasattr(self.stdin, "isatty") and self.stdin.isatty()
        self.prompt = prompt if prompt is not None else (">>> " if interactive else "")
        self.history: list[dict[str, str]] = []
        self._ids = itertools.count()
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def reply(self, user_text: str) -> str:
        """Add a user turn, stream the assistant's answer to stdout, keep both in the history."""
        self.history.append({"role": "user", "content": user_text})
        tok = self.engine.tokenizer
        text = tok.apply_chat_template(self.history, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        limit = getattr(self.engine, "max_model_len", None)
        while limit is not None and len(ids) >= limit and len(self.history) > 1:
            # forget the oldest turns (keep a system prompt) until the conversation fits
            drop = 1 if self.history[0]["role"] != "system" else 2
            if len(self.history) <= drop:
                break
            del self.history[drop - 1]
            text = tok.apply_chat_template(self.history, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, ids, self.params)
        answer = ""
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id != request_id:
                        continue
                    comp = out.outputs[0]
                    new = comp.text[len(answer):]
                    if new:
                        self._write(new)
                        answer = comp.text
        except KeyboardInterrupt:
            self.engine.abort_request(request_id)
            self._write(" [interrupted]")
        self._write("\n")
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def run(self) -> int:
        if self.prompt:
            self._write(HELP + "\n")
        while True:
            if self.prompt:
                self._write(self.prompt)
            line = self.stdin.readline()
            if not line:  # end of input
                break
            line = line.strip()
            if not line:
                continue
            if line in EXIT_COMMANDS:
                break
            if line == "/reset":
                self.reset()
                self._write("(history cleared)\n")
                continue
            self.reply(line)
        return 0
