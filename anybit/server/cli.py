"""Command-line entry points ``anybit serve`` and ``anybit chat``.

In: the argparse sub-parsers of ``anybit/cli.py`` (which adds the model folder and the engine
flags built from ``EngineConfig``) and the resulting ``EngineConfig``. Out: an exit code.
``add_serve_arguments`` / ``run_serve`` start uvicorn on ``--host`` (127.0.0.1 by default) and
``--port``; SIGTERM (or Ctrl-C) stops taking new requests (503), lets running ones finish
within ``--shutdown-timeout`` seconds, aborts the rest and exits 0; if the engine thread dies,
the server exits with status 1. ``add_chat_arguments`` /
``run_chat`` run the terminal chat on stdin/stdout. Called by ``anybit/cli.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from anybit.server.app import DEFAULT_MAX_BODY_BYTES

logger = logging.getLogger("anybit.server")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 route (or set ANYBIT_API_KEY)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model folder as given, and its basename)")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get HTTP 413")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM before they are aborted")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def model_names(model: str, served: list[str] | None) -> list[str]:
    if served:
        return list(served)
    names = [model]
    base = Path(model.rstrip("/")).name
    if base and base not in names:
        names.append(base)
    return names


def build_server(engine: Any, names: list[str], api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_waiting_requests: int | None = None):
    """LLMEngine -> (FastAPI app, AsyncEngine). Used by ``run_serve`` and the tests."""
    from anybit.server.app import create_app
    from anybit.server.async_engine import AsyncEngine
    from anybit.server.metrics import ServerMetrics
    from anybit.server.serving import ServingContext

    async_engine = AsyncEngine(engine, max_waiting_requests=max_waiting_requests)
    metrics = ServerMetrics(stats=async_engine.stats)
    ctx = ServingContext(engine=async_engine, model_names=names, metrics=metrics)
    return create_app(ctx, api_key=api_key, max_body_bytes=max_body_bytes), async_engine


class GracefulServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before the server stops."""

    def __new__(cls, config, async_engine, drain_timeout: float):
        import uvicorn

        class _Server(uvicorn.Server):
            def __init__(self):
                super().__init__(config)
                self._draining = False
                self._loop: asyncio.AbstractEventLoop | None = None
                self.engine_failed = False

            async def on_tick(self, counter: int) -> bool:
                if async_engine.error is not None and not self.engine_failed:
                    # a broken engine cannot serve anything: exit so a supervisor can restart us
                    logger.error("engine failed (%r): shutting the server down", async_engine.error)
                    self.engine_failed = True
                    return True
                return await super().on_tick(counter)

            async def startup(self, sockets=None):
                self._loop = asyncio.get_running_loop()
                await super().startup(sockets=sockets)

            def handle_exit(self, sig, frame):
                if self._draining or self._loop is None:
                    return super().handle_exit(sig, frame)  # second signal: stop now
                self._draining = True
                async_engine.accepting = False
                logger.info("signal %s: refusing new requests, draining for up to %.0f s", sig, drain_timeout)
                self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

            async def _drain(self):
                aborted = await async_engine.drain(drain_timeout)
                if aborted:
                    logger.warning("aborted %d request(s) still running after %.0f s", aborted, drain_timeout)
                await asyncio.sleep(0.2)  # let the aborted streams send their last bytes
                self.should_exit = True

        return _Server()


def run_serve(args: argparse.Namespace, engine_config: Any) -> int:
    import uvicorn

    from anybit.engine import LLMEngine

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get("ANYBIT_API_KEY") or None
    engine = LLMEngine.from_config(engine_config)
    names = model_names(engine_config.model.model, args.served_model_name)
    app, async_engine = build_server(engine, names, api_key=api_key,
                                     max_body_bytes=args.max_request_body_bytes,
                                     max_waiting_requests=engine_config.scheduler.max_waiting_requests)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    server = GracefulServer(config, async_engine, args.shutdown_timeout)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    server.run()
    return 1 if server.engine_failed else 0


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("chat")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--max-tokens", type=int, default=256, help="max tokens per reply")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed for reproducible replies")


def run_chat(args: argparse.Namespace, engine_config: Any, stdin=None, stdout=None) -> int:
    from anybit.engine import LLMEngine
    from anybit.sampling_params import SamplingParams
    from anybit.server.terminal_chat import TerminalChat

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.sampling_seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = LLMEngine.from_config(engine_config)
    chat = TerminalChat(engine, params, system=args.system, stdin=stdin, stdout=stdout)
    try:
        return chat.run()
    except KeyboardInterrupt:
        return 130

