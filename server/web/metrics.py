"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-export)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..core.model import Kind, Outcome

# the `kind` label of taskpush_events_ingested for each outcome that is news
EVENT_LABELS = {Kind.CREATED: "register", Kind.CHANGED: "change", Kind.DELETED: "delete"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "taskpush_websocket_connections", "Open authenticated WebSocket connections",
            registry=self.registry,
        )
        self.connections_total = Counter(
            "taskpush_websocket_accepted", "WebSocket connections authenticated",
            registry=self.registry,
        )
        self.sse_streams = Gauge(
            "taskpush_sse_streams", "Open authenticated Server-Sent Events streams",
            registry=self.registry,
        )
        self.sse_total = Counter(
            "taskpush_sse_accepted", "Server-Sent Events streams authenticated",
            registry=self.registry,
        )
        self.messages_sent = Counter(
            "taskpush_messages_sent", "Messages sent to WebSocket and SSE clients",
            registry=self.registry,
        )
        self.updates_merged = Counter(
            "taskpush_updates_coalesced", "Progress updates merged for clients that lag",
            registry=self.registry,
        )
        self.slow_closed = Counter(
            "taskpush_slow_consumers_closed",
            "Sockets and streams closed with 4408 for falling behind",
            registry=self.registry,
        )
        self.events = Counter(
            "taskpush_events_ingested", "Task changes committed", ["kind"],
            registry=self.registry,
        )
        self.refused = Counter(
            "taskpush_events_refused", "Task changes refused", ["code"],
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "taskpush_commit_seconds", "Time to apply and commit one write transaction",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.storage_available = Gauge(
            "taskpush_storage_available",
            "1 while the database takes writes, 0 while they answer 503 (see /healthz)",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "taskpush_commit_batch_size", "Operations per write transaction",
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 2000),
            registry=self.registry,
        )

    def observe_commit(self, outcomes: list[Outcome], seconds: float) -> None:
        """Counted per commit, not per event: one increment per kind seen."""
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(len(outcomes))
        kinds: dict[str, int] = {}
        refused: dict[str, int] = {}
        for outcome in outcomes:
            if outcome.error is not None:
                code = getattr(outcome.error, "code", "error")
                refused[code] = refused.get(code, 0) + 1
            elif outcome.news:
                kind = EVENT_LABELS[outcome.kind]
                kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in kinds.items():
            self.events.labels(kind).inc(count)
        for code, count in refused.items():
            self.refused.labels(code).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
