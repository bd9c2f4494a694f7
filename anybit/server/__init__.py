"""OpenAI-compatible HTTP server and terminal chat for anybit.

In: an ``EngineConfig`` (from ``anybit serve`` / ``anybit chat``) or an already built engine.
Out: a FastAPI app (``create_app``) driven by ``AsyncEngine``, and the CLI entry points in
``server/cli.py``. Called by ``anybit/cli.py`` and the tests.
"""
