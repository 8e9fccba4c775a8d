"""Prometheus metrics of the server (text format at ``/metrics``), one registry per app."""

from __future__ import annotations

from typing import Any

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    def __init__(self) -> None:
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        prometheus_client.disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "slimship_requests",
            "Inference requests by model, version and HTTP status",
            ["model", "version", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "slimship_request_latency_seconds",
            "Inference request latency, arrival to response",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "slimship_queue_time_seconds",
            "Time a request waited for its batch to start",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "slimship_batch_size",
            "Rows per executed batch",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_runs = Counter(
            "slimship_batch_runs",
            "Executed batches by where they ran: instance (a model instance's session on a worker thread), lone (alone,"
            " on the session with all the threads), inline (a tiny model's lone row on the event loop's thread)",
            ["model", "version", "runner"],
            registry=r,
        )
        self.verified = Gauge(
            "slimship_probe_verified",
            "The version's probe at load on this host: 1 held, 0 fell short (served by policy warn), -1 not verified",
            ["model", "version"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "slimship_queue_depth",
            "Requests waiting in an endpoint's queue",
            ["model", "version"],
            registry=r,
        )
        self.shadow_fidelity = Histogram(
            "slimship_shadow_fidelity",
            "Agreement of a shadow version's output with the "
            "primary's on the same request (cosine, or top-1 agreement for classifiers)",
            ["model", "primary", "shadow"],
            buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0),
            registry=r,
        )
        self.shadow_errors = Counter(
            "slimship_shadow_errors",
            "Shadow requests that failed (the client never sees them)",
            ["model", "shadow"],
            registry=r,
        )
        self.drift_psi = Gauge(
            "slimship_drift_psi",
            "Population stability index of a feature of a version's recent "
            "traffic against its reference (evaluation data)",
            ["model", "version", "feature"],
            registry=r,
        )
        self.drift_score = Gauge(
            "slimship_drift_score",
            "A version's drift score: its worst feature's PSI",
            ["model", "version"],
            registry=r,
        )
        self.drift_alert = Gauge(
            "slimship_drift_alert",
            "1 while a version's drift score is over its alert threshold",
            ["model", "version"],
            registry=r,
        )
        self.drift_alerts = Counter(
            "slimship_drift_alerts", "Drift alerts raised", ["model", "version"], registry=r
        )
        self.rollout_stage = Gauge(
            "slimship_rollout_stage",
            "Stage index of a model's active rollout (-1: none)",
            ["model"],
            registry=r,
        )
        self.rollout_decisions = Counter(
            "slimship_rollout_decisions", "Rollout decisions by kind", ["model", "decision"], registry=r
        )
        self.http = Counter(
            "slimship_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.grpc = Counter(
            "slimship_grpc_requests", "gRPC calls by method and status code", ["method", "code"], registry=r
        )

    def count_open_requests(self, count: Any) -> None:
        """Export ``slimship_http_requests_open``, read from ``count()`` at each scrape (the HTTP entry point's count
        of requests received and not yet answered, the scrape included; absent where nothing counts them)."""
        from prometheus_client import Gauge

        Gauge(
            "slimship_http_requests_open",
            "HTTP requests received (headers read) and not yet answered, this scrape included",
            registry=self.registry,
        ).set_function(count)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def sample(self, name: str, labels: dict[str, str] | None = None) -> Any:
        """A current value (for tests and the dashboard): ``sample("slimship_requests_total", {...})``."""
        return self.registry.get_sample_value(name, labels or {})
