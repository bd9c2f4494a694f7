"""POST /v1/completions: text completion, streamed (SSE) or not, with echo and prompt scoring.

In: the raw JSON body, the ``ServingContext`` and the ASGI ``receive`` (to notice a client that
goes away). Out: a ``CompletionResponse`` dict, or an async iterator of SSE byte chunks ending
with ``data: [DONE]``. Called by ``server/app.py``.

Choice ``i * n + j`` is completion ``j`` of prompt ``i`` (OpenAI's order). With ``echo`` the
prompt text is prepended (and, with ``logprobs``, the prompt tokens are scored; the first prompt
token has no logprob). ``echo`` with ``max_tokens=0`` returns only the prompt scoring: the engine
generates one token that is dropped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from anybit.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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
    request: CompletionRequest
    model: str
    request_id: str
    prompts: list[tuple[str | None, list[int]]]  # (text or None, ids)
    params: Any
    prompt_only: bool  # echo with max_tokens=0


def prepare(ctx: ServingContext, body: bytes) -> _Prepared:
    """Validate everything before any engine work; every problem is a 400."""
    req = parse_body(CompletionRequest, body)
    model = ctx.check_model(req.model)
    prompts = []
    for raw in req.prompts():
        ids = encode_prompt(ctx, raw)
        text = raw if isinstance(raw, str) else None
        prompts.append((text, ids))
    prompt_only = req.echo and req.max_tokens == 0
    requested = 1 if prompt_only else req.max_tokens
    max_tokens = min(resolve_max_tokens(ctx, len(ids), requested) for _, ids in prompts)
    kwargs = req.common_sampling_kwargs()
    kwargs["max_tokens"] = max_tokens
    if req.logprobs is not None:
        kwargs["logprobs"] = req.logprobs
        if req.echo:
            kwargs["prompt_logprobs"] = req.logprobs
    params = make_sampling_params(**kwargs)
    return _Prepared(req, model, random_id("cmpl"), prompts, params, prompt_only)


def _streams(ctx: ServingContext, prep: _Prepared):
    return [ctx.engine.generate(ids, prep.params, f"{prep.request_id}-{i}", timer=ctx.metrics.timer())
            for i, (_, ids) in enumerate(prep.prompts)]


def _logprobs(ctx: ServingContext, token_ids: list[int], entries: list[Any] | None, num_top: int,
              offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    entries = entries or []
    for pos, tid in enumerate(token_ids):
        entry = entries[pos] if pos < len(entries) else None
        chosen, top = position_logprobs(ctx, entry, tid, num_top)
        text = token_text(ctx, tid)
        out.tokens.append(text)
        out.token_logprobs.append(chosen)
        out.top_logprobs.append(dict(top) if entry is not None else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _merge_lp(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if a is None:
        return b
    if b is None:
        return a
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)


def _prompt_text(ctx: ServingContext, text: str | None, ids: list[int]) -> str:
    return text if text is not None else ctx.tokenizer.decode(ids, skip_special_tokens=False)


def _echo_part(ctx: ServingContext, prep: _Prepared, out: Any, text: str | None,
               ids: list[int]) -> tuple[str, CompletionLogprobs | None]:
    """Prompt text and (with logprobs) prompt scoring for an echoed choice."""
    ptext = _prompt_text(ctx, text, ids)
    lp = None
    if prep.request.logprobs is not None:
        lp = _logprobs(ctx, ids, out.prompt_logprobs, prep.request.logprobs, 0)
    return ptext, lp


async def _collect(ctx: ServingContext, prep: _Prepared) -> dict:
    finals: dict[int, Any] = {}
    async for i, out in merge_streams(_streams(ctx, prep)):
        if out.finished:
            finals[i] = out
    req = prep.request
    choices: list[CompletionChoice] = []
    prompt_tokens = completion_tokens = 0
    for i, (text, ids) in enumerate(prep.prompts):
        out = finals[i]
        prompt_tokens += len(ids)
        for comp in sorted(out.outputs, key=lambda c: c.index):
            body, gen_ids = comp.text, list(comp.token_ids)
            gen_lp = comp.logprobs
            finish, stop_reason = comp.finish_reason, comp.stop_reason
            if prep.prompt_only:
                body, gen_ids, gen_lp, finish, stop_reason = "", [], [], "length", None
            completion_tokens += len(gen_ids)
            prefix, lp = "", None
            if req.echo:
                prefix, lp = _echo_part(ctx, prep, out, text, ids)
            if req.logprobs is not None:
                lp = _merge_lp(lp, _logprobs(ctx, gen_ids, gen_lp, req.logprobs, len(prefix)))
            choices.append(CompletionChoice(index=i * req.n + comp.index, text=prefix + body, logprobs=lp,
                                            finish_reason=finish, stop_reason=stop_reason))
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
    resp = CompletionResponse(id=prep.request_id, model=prep.model, choices=choices, usage=usage)
    return resp.model_dump()


async def complete(ctx: ServingContext, body: bytes) -> tuple[_Prepared, Any]:
    """Validate and return (prepared, awaitable result dict or SSE iterator)."""
    prep = prepare(ctx, body)
    ctx.engine.check_capacity()
    if prep.request.stream:
        return prep, stream(ctx, prep)
    return prep, _collect(ctx, prep)


async def stream(ctx: ServingContext, prep: _Prepared) -> AsyncIterator[bytes]:
    req = prep.request
    created = CompletionResponse(model=prep.model, choices=[]).created
    sent_tokens: dict[int, int] = {}  # choice index -> generated tokens already sent
    sent_chars: dict[int, int] = {}  # choice index -> characters of generated text already sent
    prompt_tokens = completion_tokens = 0
    echoed: set[int] = set()
    done: set[int] = set()

    def chunk(index: int, text: str, lp: CompletionLogprobs | None, finish: str | None = None,
              stop_reason: Any = None) -> bytes:
        choice = CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish,
                                  stop_reason=stop_reason)
        return sse(CompletionResponse(id=prep.request_id, created=created, model=prep.model,
                                      choices=[choice]))

    async for i, out in merge_streams(_streams(ctx, prep)):
        text, ids = prep.prompts[i]
        if out.finished:
            prompt_tokens += len(ids)
        for comp in out.outputs:
            index = i * req.n + comp.index
            if index in done:
                continue
            prefix, lp = "", None
            if req.echo and index not in echoed:
                echoed.add(index)
                prefix, lp = _echo_part(ctx, prep, out, text, ids)
            start, chars = sent_tokens.get(index, 0), sent_chars.get(index, 0)
            token_ids, full = list(comp.token_ids), comp.text
            new_ids, new_text = token_ids[start:], full[chars:]
            if prep.prompt_only:
                new_ids, new_text = [], ""
            if req.logprobs is not None and new_ids:
                entries = (comp.logprobs or [])[start:]
                lp = _merge_lp(lp, _logprobs(ctx, new_ids, entries, req.logprobs, len(prefix)))
            sent_tokens[index], sent_chars[index] = start + len(new_ids), chars + len(new_text)
            finish = comp.finish_reason
            if prep.prompt_only and finish is not None:
                finish = "length"
            if prefix or new_text or lp is not None or finish is not None:
                yield chunk(index, prefix + new_text, lp, finish, comp.stop_reason if finish else None)
            if finish is not None:
                done.add(index)
                completion_tokens += 0 if prep.prompt_only else len(token_ids)
    if req.include_usage:
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        yield sse(CompletionResponse(id=prep.request_id, created=created, model=prep.model, choices=[],
                                     usage=usage))
    yield SSE_DONE
