"""The service's Prometheus metrics, through prometheus_client (what scrapers expect).

Label values are bounded: methods and paths outside the known sets count as "other", so no
request can add a series; batch sizes are at most --max-batch.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

METHODS = ("GET", "POST", "HEAD")
CLIENT_GONE = 499  # the status counted for a client that went away (nginx's convention)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
QUERY_PATHS = ("/v1/certify", "/v1/predict")


class ServiceMetrics:
    """One registry per service (several apps in one process never share series)."""

    def __init__(self, paths: set[str]) -> None:
        self.paths = set(paths)
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ddrs_requests",
            "HTTP requests by method, path and status.",
            ["method", "path", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ddrs_request_seconds",
            "Latency of certify and predict requests.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_queries = Counter(
            "ddrs_batch_queries",
            "Queries by the size of the engine batch they ran in.",
            ["size"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ddrs_queries_in_flight",
            "Queries received and not yet answered.",
            registry=self.registry,
        )
        self.entries = Gauge(
            "ddrs_memory_entries", "Entries in the certification memory.", registry=self.registry
        )
        self.changed = Counter(
            "ddrs_answers_changed",
            "Answers whose class the memory changed.",
            registry=self.registry,
        )
        self.shrunk = Counter(
            "ddrs_answers_shrunk", "Answers whose radius the memory shrank.", registry=self.registry
        )
        self.repeats = Counter(
            "ddrs_answers_repeat", "Exact repeats answered from the memory.", registry=self.registry
        )
        self.batches: dict[int, int] = {}  # queries by engine batch size, for tests and logs

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        known = path if path in self.paths else "other"
        self.requests.labels(method, known, str(status)).inc()
        if known in QUERY_PATHS:
            self.latency.observe(seconds)

    def batch(self, size: int) -> None:
        self.batch_queries.labels(str(size)).inc(size)
        self.batches[size] = self.batches.get(size, 0) + size

    def answered(self, answer) -> None:
        if answer.repeat:  # the stored answer again: its changes were counted when stored
            self.repeats.inc()
            return
        self.changed.inc(int(answer.changed))
        self.shrunk.inc(int(answer.shrunk))

    def text(self, entries: int, in_flight: int) -> bytes:
        self.entries.set(entries)
        self.in_flight.set(in_flight)
        return generate_latest(self.registry)
