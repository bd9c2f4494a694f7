"""Asynchronous driver around the synchronous ``LLMEngine``.

In: ``generate(prompt, params, request_id)`` calls from request handlers on the asyncio loop,
and ``abort(request_id)``. Out: an async iterator of the engine's ``RequestOutput`` objects for
that request (cumulative text + deltas), ending with the one whose ``finished`` is true.
Called by ``server/serving.py`` (HTTP handlers) and ``server/app.py`` (lifespan, drain, stats).

One background thread owns the engine: it takes new requests and aborts from two lock-guarded
lists, calls ``engine.step()`` while there is work, and hands each output to the loop of the
request's consumer with ``loop.call_soon_threadsafe``. The engine is never touched from any
other thread. A consumer that goes away (client disconnect -> ``CancelledError`` /
``GeneratorExit`` inside ``generate``) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from anybit.server.metrics import RequestTimer

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served any more."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_waiting_requests`` allows (HTTP 503)."""


class NotAcceptingError(RuntimeError):
    """The server is shutting down and takes no new requests (HTTP 503)."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown timeout) before it finished."""


class _Stream:
    """Per-request hand-off from the engine thread to the consumer's event loop."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Owns an ``LLMEngine`` and drives it from one background thread."""

    def __init__(self, engine: Any, max_waiting_requests: int | None = None, idle_poll_s: float = 0.25):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int | None = getattr(engine, "max_model_len", None)
        cache_config = getattr(getattr(engine, "config", None), "cache", None)
        self.block_size: int | None = getattr(cache_config, "block_size", None)
        self.max_waiting_requests = max_waiting_requests
        self._idle_poll_s = idle_poll_s
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._adds: list[tuple[str, Any, Any]] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._in_transit = 0  # adds taken by the engine thread but not yet in the stats snapshot
        self._stats: dict[str, Any] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.accepting = True
        self.num_steps = 0

    @classmethod
    def from_config(cls, engine_config: Any) -> AsyncEngine:
        from anybit.engine import LLMEngine

        engine = LLMEngine.from_config(engine_config)
        return cls(engine, max_waiting_requests=engine_config.scheduler.max_waiting_requests)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._refresh_stats()
        self._thread = threading.Thread(target=self._run, name="anybit-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything still running and stop the engine thread."""
        self.accepting = False
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._fail(rid, RequestAbortedError("server shutting down"))
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def drain(self, timeout: float) -> int:
        """Stop accepting, wait up to ``timeout`` s for running requests, abort the rest.

        Returns how many requests had to be aborted.
        """
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.num_active() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            ids = list(self._streams)
        for rid in ids:
            self._fail(rid, RequestAbortedError("server shutting down: request aborted after the "
                                                "graceful-shutdown timeout"))
        return len(ids)

    def kv_capacity_tokens(self) -> int | None:
        """Tokens the whole KV cache holds (one request can never use more), None if unknown."""
        total = self.stats().get("num_total_blocks")
        return total * self.block_size if total and self.block_size else None

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ requests

    def num_active(self) -> int:
        with self._lock:
            return len(self._streams)

    def stats(self) -> dict[str, Any]:
        """Latest snapshot of ``engine.get_stats()`` plus ``num_pending`` (not yet added)."""
        with self._lock:
            out = dict(self._stats)
            pending = len(self._adds) + self._in_transit
        out["num_pending"] = pending
        return out

    def check_capacity(self) -> None:
        """Raise if a new request must be refused (503) or the engine is dead."""
        if self.error is not None:
            raise EngineDeadError(f"engine failed: {self.error!r}")
        if not self.accepting:
            raise NotAcceptingError("server is shutting down")
        if self.max_waiting_requests is not None:
            with self._lock:
                waiting = int(self._stats.get("num_waiting", 0)) + len(self._adds) + self._in_transit
            if waiting >= self.max_waiting_requests:
                raise QueueFullError(f"too many requests waiting ({waiting} >= {self.max_waiting_requests}); "
                                     "retry later")

    async def generate(self, prompt: Any, params: Any, request_id: str,
                       timer: RequestTimer | None = None) -> AsyncIterator[Any]:
        """Submit one request and yield its outputs until it finishes.

        Leaving the iteration early (cancellation, ``aclose``) aborts the request.
        """
        self.check_capacity()
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id: {request_id!r} is already running")
            self._streams[request_id] = stream
            self._adds.append((request_id, prompt, params))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine side already dropped it
                    if timer is not None:
                        timer.finish("abort" if isinstance(item, RequestAbortedError) else "error")
                    raise item
                if timer is not None:
                    timer.on_output(len(item.prompt_token_ids or ()),
                                    sum(len(c.token_ids) for c in item.outputs), len(item.outputs))
                if item.finished:
                    finished = True
                    if timer is not None:
                        timer.finish(item.outputs[0].finish_reason if item.outputs else None)
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
                if timer is not None:
                    timer.finish("abort")

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, idempotent)."""
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return
            self._aborts.append(request_id)
        self._wakeup.set()

    def _fail(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            self._aborts.append(request_id)
        self._wakeup.set()
        stream.put(exc)

    # ------------------------------------------------------------------ engine thread

    def _refresh_stats(self) -> None:
        get_stats = getattr(self.engine, "get_stats", None)
        stats = dict(get_stats()) if get_stats is not None else {}
        with self._lock:
            self._stats = stats
            self._in_transit = 0

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                with self._lock:
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    self._in_transit = len(adds)
                for rid, prompt, params in adds:
                    try:
                        engine.add_request(rid, prompt, params)
                    except Exception as exc:  # bad request: hand the error to its consumer only
                        with self._lock:
                            stream = self._streams.pop(rid, None)
                        if stream is not None:
                            stream.put(exc)
                for rid in aborts:
                    try:
                        engine.abort_request(rid)
                    except Exception:  # already finished or never added
                        logger.debug("abort of %s ignored", rid, exc_info=True)
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self.num_steps += 1
                    self._deliver(outputs)
                    self._refresh_stats()
                else:
                    self._refresh_stats()
                    self._wakeup.wait(self._idle_poll_s)
                    self._wakeup.clear()
        except BaseException as exc:  # the engine is broken: fail every request
            logger.exception("engine thread failed")
            self.error = exc
            self.accepting = False
            with self._lock:
                streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.put(EngineDeadError(f"engine failed: {exc!r}"))

    def _deliver(self, outputs: list[Any]) -> None:
        with self._lock:
            targets = []
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                targets.append((stream, out))
        for stream, out in targets:
            stream.put(out)
