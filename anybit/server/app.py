"""FastAPI application factory for the OpenAI-compatible server.

In: an ``AsyncEngine`` (started by the app's lifespan if it is not running yet), the names the
model answers to, an optional API key and a request-body limit. Out: the ASGI app with
POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health and GET /metrics.
Called by ``server/cli.py`` (``anybit serve``) and the tests.

Every error is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``: 400 for
bad input (pydantic's 422 included), 401 without the right ``Authorization: Bearer`` key on
/v1 routes, 413 for a body over the limit, 503 when the waiting queue is full or the server is
draining for shutdown.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from anybit.server import chat, completions
from anybit.server.async_engine import (
    EngineDeadError,
    NotAcceptingError,
    QueueFullError,
    RequestAbortedError,
)
from anybit.server.errors import (
    OpenAIError,
    error_body,
    error_response,
    from_validation_errors,
    from_value_error,
)
from anybit.server.metrics import ServerMetrics
from anybit.server.protocol import ModelCard, ModelList
from anybit.server.serving import SSE_DONE, ClientDisconnected, ServingContext, run_unless_disconnected, sse

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyTooLarge(Exception):
    pass


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that watches for the client going away whatever ASGI spec version the
    server reports (Starlette only does so below 2.4), and always closes its iterator, so the
    engine request is aborted promptly however the stream ends."""

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    with contextlib.suppress(OSError):  # client gone while sending
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


class GuardMiddleware:
    """Pure ASGI middleware: body-size limit (413) and API key on /v1 routes (401)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status_box = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                resp = error_response("invalid or missing API key: send 'Authorization: Bearer <key>'",
                                      401, code="invalid_api_key")
                return await resp(scope, receive, send_wrapper)
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                return await self._too_large(scope, receive, send_wrapper)
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body_bytes:
                        raise BodyTooLarge()
                return message

            return await self.app(scope, limited_receive, send_wrapper)
        finally:
            route = path if path in _ROUTES else "other"
            self.metrics.count_http(route, status_box["status"])

    async def _too_large(self, scope, receive, send):
        resp = error_response(f"request body is larger than the limit of {self.max_body_bytes} bytes", 413,
                              code="request_too_large")
        await resp(scope, receive, send)

    def _authorized(self, scope) -> bool:
        for key, value in scope.get("headers") or []:
            if key == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                given = token.strip().encode("latin-1")
                return scheme.lower() == "bearer" and hmac.compare_digest(given, self.api_key.encode())
        return False


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _error_from(exc: BaseException) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, (QueueFullError, NotAcceptingError, EngineDeadError, RequestAbortedError)):
        return OpenAIError(str(exc), status=503, code="service_unavailable")
    if isinstance(exc, ValueError):  # the engine rejected the request
        return from_value_error(exc)
    logger.exception("internal error", exc_info=exc)
    return OpenAIError(f"internal error: {type(exc).__name__}", status=500, code="internal_error")


async def _sse_guard(it: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Turn an exception in the middle of a stream into an error event followed by [DONE]."""
    try:
        async for item in it:
            yield item
    except Exception as exc:  # noqa: BLE001
        err = _error_from(exc)
        yield sse(error_body(err.message, err.status, err.param, err.code, err.err_type))
        yield SSE_DONE
    finally:
        with contextlib.suppress(Exception):
            await it.aclose()


async def _first(it: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _prepend(first: bytes | None, it: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield first
        async for item in it:
            yield item
    finally:  # closing the outer stream closes the inner one, which aborts its engine request
        with contextlib.suppress(Exception):
            await it.aclose()


def create_app(ctx: ServingContext, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """Build the app around a ``ServingContext``; the lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        try:
            yield
        finally:
            ctx.engine.shutdown()

    app = FastAPI(title="anybit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code, code=str(exc.status_code))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge):
        return error_response(f"request body is larger than the limit of {max_body_bytes} bytes", 413,
                              code="request_too_large")

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return _error_from(exc).response()

    @app.get("/health")
    async def health():
        eng = ctx.engine
        if eng.error is not None:
            return error_response(f"engine failed: {eng.error!r}", 503, code="engine_dead")
        if not eng.accepting:
            return error_response("server is shutting down", 503, code="shutting_down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        data, content_type = ctx.metrics.render()
        return Response(content=data, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        cards = [ModelCard(id=name, max_model_len=ctx.engine.max_model_len) for name in ctx.model_names[:1]]
        return ModelList(data=cards).model_dump()

    async def _serve(request: Request, module) -> Response:
        body = await request.body()
        try:
            _, result = await module.complete(ctx, body)
        except (QueueFullError, NotAcceptingError, EngineDeadError) as exc:
            raise _error_from(exc) from None
        if not hasattr(result, "__aiter__"):
            try:
                data = await run_unless_disconnected(request.receive, result)
            except (QueueFullError, NotAcceptingError, EngineDeadError, RequestAbortedError,
                    ValueError) as exc:
                raise _error_from(exc) from None
            return JSONResponse(data)
        # Wait for the first chunk (the engine accepted the request and produced output) so that
        # a rejection is still an HTTP error rather than an error event inside a 200 stream.
        try:
            first = await run_unless_disconnected(request.receive, _first(result))
        except (QueueFullError, NotAcceptingError, EngineDeadError, RequestAbortedError,
                ValueError) as exc:
            with contextlib.suppress(Exception):
                await result.aclose()
            raise _error_from(exc) from None
        return ClosingStreamingResponse(_sse_guard(_prepend(first, result)), media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        return await _serve(request, completions)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request):
        return await _serve(request, chat)

    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=ctx.metrics)
    return app
