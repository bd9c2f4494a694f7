"""POST /v1/chat/completions: chat completion through the model's chat template, streamed or not.

In: the raw JSON body and the ``ServingContext``. The messages are rendered with
``Tokenizer.apply_chat_template`` (sandboxed Jinja) and encoded without extra special tokens (the
template writes BOS itself). Out: a ``ChatCompletionResponse`` dict, or an async iterator of SSE
byte chunks (``chat.completion.chunk``: a first delta with the role, content deltas, a last one
with ``finish_reason``, an optional usage chunk, then ``data: [DONE]``). Called by
``server/app.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from anybit.server.errors import OpenAIError
from anybit.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    random_id,
)
from anybit.server.serving import (
    SSE_DONE,
    ServingContext,
    encode_prompt,
    make_sampling_params,
    merge_streams,
    parse_body,
    position_logprobs,
    resolve_max_tokens,
    sse,
    token_text,
)


@dataclass
class _Prepared:
    request: ChatCompletionRequest
    model: str
    request_id: str
    prompt_ids: list[int]
    params: Any
    num_top: int | None  # None: no logprobs


def render_prompt(ctx: ServingContext, req: ChatCompletionRequest) -> list[int]:
    try:
        text = ctx.tokenizer.apply_chat_template(req.plain_messages(),
                                                 add_generation_prompt=req.add_generation_prompt)
    except (ValueError, TypeError) as exc:
        raise OpenAIError(f"messages: cannot apply the chat template: {exc}", param="messages",
                          code="invalid_value") from None
    except Exception as exc:  # jinja2 errors (raise_exception in templates, sandbox violations)
        raise OpenAIError(f"messages: the chat template rejected the conversation: {exc}", param="messages",
                          code="invalid_value") from None
    return encode_prompt(ctx, text, param="messages", add_special_tokens=False)


def prepare(ctx: ServingContext, body: bytes) -> _Prepared:
    req = parse_body(ChatCompletionRequest, body)
    model = ctx.check_model(req.model)
    ids = render_prompt(ctx, req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(ctx, len(ids), req.requested_max_tokens, param=param,
                                    prompt_param="messages")
    kwargs = req.common_sampling_kwargs()
    kwargs["max_tokens"] = max_tokens
    num_top = None
    if req.logprobs:
        num_top = req.top_logprobs or 0
        kwargs["logprobs"] = num_top
    params = make_sampling_params(**kwargs)
    return _Prepared(req, model, random_id("chatcmpl"), ids, params, num_top)


def _logprobs(ctx: ServingContext, token_ids: list[int], entries: list[Any] | None,
              num_top: int) -> ChatLogprobs:
    content = []
    entries = entries or []
    for pos, tid in enumerate(token_ids):
        entry = entries[pos] if pos < len(entries) else None
        chosen, top = position_logprobs(ctx, entry, tid, num_top)
        text = token_text(ctx, tid)
        content.append(TokenLogprob(
            token=text, logprob=chosen if chosen is not None else float("-inf"),
            bytes=list(text.encode("utf-8")),
            top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode("utf-8"))) for t, lp in top]))
    return ChatLogprobs(content=content)


def _stream(ctx: ServingContext, prep: _Prepared):
    return ctx.engine.generate(prep.prompt_ids, prep.params, prep.request_id, timer=ctx.metrics.timer())


async def _collect(ctx: ServingContext, prep: _Prepared) -> dict:
    final = None
    async for _, out in merge_streams([_stream(ctx, prep)]):
        if out.finished:
            final = out
    assert final is not None
    choices = []
    completion_tokens = 0
    for comp in sorted(final.outputs, key=lambda c: c.index):
        completion_tokens += len(comp.token_ids)
        lp = None
        if prep.num_top is not None:
            lp = _logprobs(ctx, list(comp.token_ids), comp.logprobs, prep.num_top)
        message = ChatResponseMessage(content=comp.text)
        choices.append(ChatChoice(index=comp.index, message=message, logprobs=lp,
                                  finish_reason=comp.finish_reason, stop_reason=comp.stop_reason))
    n_prompt = len(prep.prompt_ids)
    usage = UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion_tokens,
                      total_tokens=n_prompt + completion_tokens)
    return ChatCompletionResponse(id=prep.request_id, model=prep.model, choices=choices,
                                  usage=usage).model_dump()


async def complete(ctx: ServingContext, body: bytes) -> tuple[_Prepared, Any]:
    """Validate and return (prepared, awaitable result dict or SSE iterator)."""
    prep = prepare(ctx, body)
    ctx.engine.check_capacity()
    if prep.request.stream:
        return prep, stream(ctx, prep)
    return prep, _collect(ctx, prep)


async def stream(ctx: ServingContext, prep: _Prepared) -> AsyncIterator[bytes]:
    req = prep.request
    created = ChatCompletionResponse(model=prep.model, choices=[]).created

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> bytes:
        return sse(ChatCompletionChunk(id=prep.request_id, created=created, model=prep.model,
                                       choices=choices, usage=usage))

    sent_tokens: dict[int, int] = {}
    sent_chars: dict[int, int] = {}
    done: set[int] = set()
    completion_tokens = 0
    first = True
    async for _, out in merge_streams([_stream(ctx, prep)]):
        if first:  # sent once the engine accepted the request, so a rejection is still an HTTP error
            first = False
            yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                         for j in range(req.n)])
        for comp in out.outputs:
            j = comp.index
            if j in done:
                continue
            start, chars = sent_tokens.get(j, 0), sent_chars.get(j, 0)
            token_ids, full = list(comp.token_ids), comp.text
            new_ids, new_text = token_ids[start:], full[chars:]
            sent_tokens[j], sent_chars[j] = start + len(new_ids), chars + len(new_text)
            lp = None
            if prep.num_top is not None and new_ids:
                lp = _logprobs(ctx, new_ids, (comp.logprobs or [])[start:], prep.num_top)
            finish = comp.finish_reason
            if new_text or lp is not None or finish is not None:
                delta = DeltaMessage(content=new_text) if (new_text or finish is None) else DeltaMessage()
                yield chunk([ChatChunkChoice(index=j, delta=delta, logprobs=lp, finish_reason=finish,
                                             stop_reason=comp.stop_reason if finish else None)])
            if finish is not None:
                done.add(j)
                completion_tokens += len(token_ids)
    if req.include_usage:
        n_prompt = len(prep.prompt_ids)
        yield chunk([], UsageInfo(prompt_tokens=n_prompt, completion_tokens=completion_tokens,
                                  total_tokens=n_prompt + completion_tokens))
    yield SSE_DONE
