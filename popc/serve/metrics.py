"""Prometheus metrics for ``popc serve``, in a registry of the app's own (not the process-wide
default), so that several servers in one process (tests, replicas) never clash.

The engine's gauges and token totals are read from ``engine.stats()`` at scrape time;
tokens per second is ``rate(popc_generated_tokens_total[1m])``. Latencies are observed by
the HTTP layer as each request finishes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from popc.serve.engine import Engine

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineCollector(Collector):
    """The engine's queue, running batch and token totals, read when scraped."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator:
        stats = self.engine.stats()
        yield GaugeMetricFamily("popc_waiting_requests", "Requests waiting for a batch slot.", value=stats.waiting)
        yield GaugeMetricFamily("popc_running_sequences", "Sequences in the running batch.", value=stats.running)
        yield GaugeMetricFamily("popc_max_batch", "The running batch's capacity (--max-batch).", self.engine.max_batch)
        yield CounterMetricFamily("popc_prompt_tokens", "Prompt tokens prefilled.", value=stats.prompt_tokens)
        yield CounterMetricFamily("popc_generated_tokens", "Tokens generated.", value=stats.generated_tokens)
        yield CounterMetricFamily("popc_sequences_finished", "Sequences finished (any reason).", value=stats.finished)
        yield CounterMetricFamily("popc_sequences_failed", "Sequences the engine failed.", value=stats.failed)


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(EngineCollector(engine))
        self.requests = Counter(
            "popc_requests",
            "HTTP requests answered, by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "popc_time_to_first_token_seconds",
            "From a request's arrival to its first text (or its end, if it has none).",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "popc_time_per_output_token_seconds",
            "Each finished request's mean time per generated token after its first.",
            buckets=PER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "popc_request_duration_seconds",
            "From a generation request's arrival to its last token.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, first_at: float | None, done_at: float, started: float, completion_tokens: int) -> None:
        """One finished generation's latencies (``perf_counter`` times)."""
        if first_at is not None:
            self.time_to_first_token.observe(max(0.0, first_at - started))
            if completion_tokens > 1:
                self.time_per_output_token.observe(max(0.0, done_at - first_at) / (completion_tokens - 1))
        self.request_duration.observe(max(0.0, done_at - started))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
