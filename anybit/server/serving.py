"""Shared machinery of the OpenAI handlers: validation, tokenization, streams, logprobs, SSE.

In: the raw request body and the ``AsyncEngine``. Out: validated request models, prompt token
ids checked against the context length, ``SamplingParams``, merged per-prompt output streams,
SSE lines, and OpenAI logprob structures. Called by ``server/completions.py`` and
``server/chat.py``; ``ServingContext`` is built once by ``server/app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from anybit.sampling_params import SamplingParams
from anybit.server.async_engine import AsyncEngine
from anybit.server.errors import OpenAIError, from_validation_errors, from_value_error
from anybit.server.metrics import ServerMetrics

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class ServingContext:
    """What every handler needs: the engine driver, the names the model answers to, metrics."""

    engine: AsyncEngine
    model_names: list[str]
    metrics: ServerMetrics

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def check_model(self, model: str | None) -> str:
        """The model name to report; unknown names are a 400 naming ``model``."""
        if model is None or model in self.model_names:
            return self.model_name
        names = ', '.join(self.model_names)
        raise OpenAIError(f"model: the model {model!r} does not exist; available: {names}",
                          param="model", code="model_not_found")


def parse_body(model_cls: type[M], body: bytes) -> M:
    """Validate a JSON body strictly; any problem becomes a 400 naming the offending field."""
    if not body.strip():
        raise OpenAIError("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors(include_url=False)) from None


def encode_prompt(ctx: ServingContext, prompt: str | list[int], param: str = "prompt",
                  add_special_tokens: bool = True) -> list[int]:
    """Prompt text (or ids) -> ids; empty prompts and out-of-vocabulary ids are 400s."""
    tok = ctx.tokenizer
    if isinstance(prompt, str):
        if not prompt:
            raise OpenAIError(f"{param}: must not be empty", param=param, code="invalid_value")
        ids = tok.encode(prompt, add_special_tokens=add_special_tokens)
    else:
        ids = list(prompt)
        vocab = getattr(tok, "vocab_size", None)
        bad = [i for i in ids if vocab is not None and i >= vocab]
        if bad:
            raise OpenAIError(f"{param}: token id {bad[0]} is out of range (vocabulary of {vocab} tokens)",
                              param=param, code="invalid_value")
    if not ids:
        raise OpenAIError(f"{param}: encodes to no tokens", param=param, code="invalid_value")
    return ids


def resolve_max_tokens(ctx: ServingContext, num_prompt_tokens: int, requested: int | None,
                       param: str = "max_tokens", prompt_param: str = "prompt") -> int:
    """Check the prompt fits the context and return the number of tokens to generate."""
    limit = ctx.engine.max_model_len
    if limit is None:
        return requested if requested is not None else 256
    if num_prompt_tokens >= limit:
        raise OpenAIError(
            f"{prompt_param}: this model's maximum context length is {limit} tokens, but the prompt has "
            f"{num_prompt_tokens} tokens (at least one token must be left for the completion)",
            param=prompt_param, code="context_length_exceeded")
    room = limit - num_prompt_tokens
    capacity = ctx.engine.kv_capacity_tokens()
    if capacity is not None and capacity < limit:
        # the engine cannot finish a request that outgrows the whole KV cache: refuse it up front
        if num_prompt_tokens >= capacity:
            raise OpenAIError(
                f"{prompt_param}: the prompt has {num_prompt_tokens} tokens but the KV cache holds only "
                f"{capacity} tokens", param=prompt_param, code="context_length_exceeded")
        cap_room = capacity - num_prompt_tokens
        if requested is None:
            return min(room, cap_room)
        if requested > cap_room:
            raise OpenAIError(
                f"{param}: {num_prompt_tokens} prompt tokens plus {requested} completion tokens exceed the "
                f"KV cache of {capacity} tokens; ask for at most {cap_room}",
                param=param, code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise OpenAIError(
            f"{param}: this model's maximum context length is {limit} tokens; you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} for "
            "the completion). Reduce the prompt or the completion length.",
            param=param, code="context_length_exceeded")
    return requested


def make_sampling_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise from_value_error(exc) from None


# ----------------------------------------------------------------------------- streams

async def merge_streams(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several output streams as ``(stream_index, item)``; errors propagate.

    Leaving early cancels every producer, which aborts its engine request.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    raise OpenAIError("request cancelled", status=503)
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready."""


async def run_unless_disconnected(receive: Callable[[], Awaitable[dict]], coro: Awaitable[T]) -> T:
    """Await ``coro``; if the client disconnects first, cancel it (which aborts its requests)
    and raise ``ClientDisconnected``."""
    work = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watcher.cancel()
        work.cancel()
        raise
    watcher.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise ClientDisconnected()
    return work.result()


def sse(payload: BaseModel | dict) -> bytes:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


# ----------------------------------------------------------------------------- logprobs

def _lp_items(entry: Any) -> list[tuple[int, float, int | None]]:
    """One position of engine logprobs -> [(token_id, logprob, rank)] (sampled token first if known)."""
    if entry is None:
        return []
    if isinstance(entry, dict):
        items = []
        for tid, v in entry.items():
            lp = getattr(v, "logprob", v)
            rank = getattr(v, "rank", None)
            items.append((int(tid), float(lp), rank))
        return items
    raise TypeError(f"unsupported logprobs entry {type(entry).__name__}")


def token_text(ctx: ServingContext, token_id: int) -> str:
    tok = ctx.tokenizer
    fn = getattr(tok, "decode_token", None)
    return fn(token_id) if fn is not None else tok.decode([token_id], skip_special_tokens=False)


def position_logprobs(ctx: ServingContext, entry: Any, token_id: int,
                      num_top: int) -> tuple[float | None, list[tuple[str, float]]]:
    """(logprob of ``token_id``, top ``num_top`` as (text, logprob) sorted by logprob)."""
    items = _lp_items(entry)
    chosen = None
    for tid, lp, _ in items:
        if tid == token_id:
            chosen = lp
    ranked = sorted(items, key=lambda x: -x[1])
    top = [(token_text(ctx, tid), lp) for tid, lp, _ in ranked[:num_top]]
    return chosen, top
