"""OpenAI-compatible HTTP server and terminal chat for anybit.

In: an ``EngineConfig`` (from ``anybit serve`` / ``anybit chat``) or an already built engine.
Out: a FastAPI app (``app.create_app``) driven by ``async_engine.AsyncEngine``, and the CLI entry
points in ``cli.py``. Called by ``anybit/cli.py`` and the tests.

Usage::

    anybit serve MODEL_DIR --port 8000 --api-key sk-...      # 127.0.0.1 unless --host is given
    curl -s localhost:8000/v1/completions -H "Authorization: Bearer sk-..." \
        -d '{"prompt": "Hello", "max_tokens": 16}'
    printf 'hi\n/exit\n' | anybit chat MODEL_DIR --max-tokens 64

Files: ``protocol.py`` (pydantic models), ``errors.py`` (OpenAI error bodies), ``serving.py``
(shared handler machinery), ``completions.py`` / ``chat.py`` (the two endpoints), ``app.py``
(routes, auth, body limit), ``async_engine.py`` (engine thread), ``metrics.py`` (Prometheus),
``cli.py`` + ``terminal_chat.py`` (commands).
"""
