"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

Counters and histograms are updated by the engine thread (tokens, time to first token,
inter-token latency, finished / failed / cancelled requests) and by the HTTP layer
(rejections by reason); gauges read the engine's state when scraped (running and waiting
requests, KV-cache usage, speculative acceptance, prefix-cache hits).

May call: ``prometheus_client``; the engine loop and its generator's public counters (read only).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Every metric of one server, named ``decodekit_*``."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("decodekit_requests", "Requests finished, by finish reason of their first "
                                "output", ["finish_reason"], registry=r)
        self.failures = Counter("decodekit_request_failures",
                                "Requests that failed inside the engine (HTTP 500)",
                                registry=r)
        self.cancellations = Counter("decodekit_request_cancellations",
                                     "Requests cancelled before they finished (client gone)", registry=r)
        self.rejections = Counter("decodekit_request_rejections",
                                  "Requests refused before they ran, by reason",
                                  ["reason"], registry=r)
        self.generation_tokens = Counter("decodekit_generation_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("decodekit_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.ttft = Histogram("decodekit_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("decodekit_inter_token_latency_seconds", "Time per token after the first",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("decodekit_request_latency_seconds",
                             "Arrival to last token of finished requests",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("decodekit_requests_running", "Requests holding a slot", registry=r)
        self.waiting = Gauge("decodekit_requests_waiting", "Requests waiting for a slot", registry=r)
        self.kv_usage = Gauge("decodekit_kv_cache_usage", "Fraction of the KV cache held by requests "
                              "(paged: blocks; static: slots)", registry=r)
        self.spec_drafted = Gauge("decodekit_spec_drafted_tokens", "Draft tokens proposed", registry=r)
        self.spec_accepted = Gauge("decodekit_spec_accepted_tokens", "Draft tokens accepted", registry=r)
        self.prefix_hits = Gauge("decodekit_prefix_cache_hit_tokens",
                                 "Prompt tokens reused from the prefix cache",
                                 registry=r)

    def bind(self, engine: Any) -> None:
        """Gauges that read ``engine`` (an :class:`~.engine.EngineLoop`) when scraped."""
        gen = engine.gen
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.queued)
        self.kv_usage.set_function(lambda: gen.kv_usage)
        self.spec_drafted.set_function(lambda: gen.spec_stats.drafted)
        self.spec_accepted.set_function(lambda: gen.spec_stats.accepted)
        self.prefix_hits.set_function(lambda: 0 if gen.kv_stats is None else gen.kv_stats.prefix_hit_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ events
    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def failed(self) -> None:
        self.failures.inc()

    def cancelled(self) -> None:
        self.cancellations.inc()

    def observe_tokens(self, job: Any, n: int, now: float) -> None:
        """``n`` new tokens of ``job`` at ``now`` (perf_counter)."""
        if n <= 0:
            return
        self.generation_tokens.inc(n)
        job.tokens += n
        if job.first_token is None:
            job.first_token = now
            self.ttft.observe(now - job.arrival)
            n -= 1
        elif job.last_token is not None:
            per = (now - job.last_token) / n
            for _ in range(n):
                self.itl.observe(per)
        job.last_token = now

    def finished(self, job: Any, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        out = job.groups[0].output()
        self.requests.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(sum(len(g.contexts[0].prompt_token_ids) for g in job.groups))
        self.e2e.observe(now - job.arrival)
