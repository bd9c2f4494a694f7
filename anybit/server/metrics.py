"""Prometheus metrics of the server, on a registry of its own (one per app, so tests can build many).

In: HTTP results from the app middleware (``count_http``), per-request timings and token counts
from ``AsyncEngine.generate`` (``RequestTimer``), and a ``stats()`` callable that returns the
engine's ``get_stats()`` snapshot (read at scrape time). Out: the text exposition served at
``GET /metrics`` (``render()``). Called by ``server/app.py`` and ``server/async_engine.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series: they only add noise to scrapes

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    """All server metrics; ``stats`` is called at scrape time for the engine gauges."""

    def __init__(self, stats: Callable[[], dict] | None = None, model_name: str = ""):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("anybit_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=r)
        self.requests_finished = Counter("anybit_request_finished", "Finished generation requests by reason",
                                         ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("anybit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("anybit_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("anybit_time_to_first_token_seconds", "Time from arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("anybit_inter_token_latency_seconds", "Time between consecutive output tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("anybit_e2e_request_latency_seconds", "Time from arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("anybit_request_prompt_tokens", "Prompt length per request",
                                    buckets=_TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram("anybit_request_generation_tokens", "Generated tokens per request",
                                 buckets=_TOKEN_BUCKETS, registry=r)
        self._stats = stats or (lambda: {})
        for key, name, doc in (
            ("num_waiting", "anybit_num_requests_waiting", "Requests waiting to be scheduled"),
            ("num_running", "anybit_num_requests_running", "Requests being generated"),
            ("kv_cache_usage", "anybit_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)"),
            ("num_free_blocks", "anybit_kv_cache_free_blocks", "Free KV-cache blocks"),
            ("num_total_blocks", "anybit_kv_cache_total_blocks", "All KV-cache blocks"),
            ("num_preemptions", "anybit_num_preemptions", "Preemptions since start (cumulative)"),
            ("prefix_cache_queries", "anybit_prefix_cache_queries", "Prefix-cache lookups (cumulative)"),
            ("prefix_cache_hits", "anybit_prefix_cache_hits", "Prefix-cache block hits (cumulative)"),
        ):
            Gauge(name, doc, registry=r).set_function(lambda key=key: float(self._stats().get(key, 0) or 0))

    def count_http(self, route: str, status: int) -> None:
        self.http_requests.labels(route=route, status=str(status)).inc()

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Timing of one engine request: feed it every output, then ``finish``."""

    __slots__ = ("metrics", "arrival", "last", "num_generated", "prompt_tokens", "done")

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last: float | None = None
        self.num_generated = 0
        self.prompt_tokens = 0
        self.done = False

    def on_output(self, prompt_tokens: int, total_generated: int, num_choices: int = 1) -> None:
        """Record an output with ``total_generated`` tokens so far over all ``num_choices`` choices."""
        now = time.perf_counter()
        new = total_generated - self.num_generated
        if new <= 0:
            return
        self.prompt_tokens = prompt_tokens
        if self.last is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            per_choice = max(1, round(new / max(1, num_choices)))
            gap = (now - self.last) / per_choice
            for _ in range(min(per_choice, 64)):
                self.metrics.itl.observe(gap)
        self.metrics.generation_tokens.inc(new)
        self.num_generated = total_generated
        self.last = now

    def finish(self, finish_reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        m = self.metrics
        m.requests_finished.labels(finish_reason=finish_reason or "abort").inc()
        m.prompt_tokens.inc(self.prompt_tokens)
        m.e2e.observe(time.perf_counter() - self.arrival)
        m.prompt_len.observe(self.prompt_tokens)
        m.gen_len.observe(self.num_generated)
