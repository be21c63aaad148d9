"""The router's own Prometheus metrics, in its own registry.

Every request the router receives ends exactly once, as a relayed backend response (``responses_total``
by backend and status) or as an error the router answered or ended itself (``errors_total`` by kind), so
``requests_received_total == sum(responses_total) + sum(errors_total)``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()

DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 1e-2)
ERROR_KINDS = ("bad_request", "unknown_model", "no_backend", "upstream_midstream", "client_disconnect", "internal")


class RouterMetrics:
    def __init__(self, backends: list[str]) -> None:
        self.registry = r = CollectorRegistry()
        self.backends = backends
        self.received = Counter("servegym_router_requests_received", "Requests received.", registry=r)
        self.routed = Counter("servegym_router_routed", "Attempts sent to a backend.", ["backend"], registry=r)
        self.responses = Counter(
            "servegym_router_responses", "Backend responses relayed in full.", ["backend", "status"], registry=r
        )
        self.errors = Counter("servegym_router_errors", "Requests ended by an error.", ["kind"], registry=r)
        self.failovers = Counter("servegym_router_failovers", "Attempts moved to another backend.", registry=r)
        self.decision = Histogram(
            "servegym_router_decision_seconds", "Policy decision latency.", buckets=DECISION_BUCKETS, registry=r
        )
        self.scrape_age = Gauge(
            "servegym_router_scrape_age_seconds", "Age of the latest scrape.", ["backend"], registry=r
        )
        self.up = Gauge("servegym_router_backend_up", "1 while the backend is routed to.", ["backend"], registry=r)
        self.outstanding = Gauge("servegym_router_outstanding", "Requests in flight.", ["backend"], registry=r)
        for backend in backends:
            self.routed.labels(backend)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)

    def render(self, ages: list[float], up: list[bool], outstanding: list[int]) -> bytes:
        for backend, age, is_up, count in zip(self.backends, ages, up, outstanding, strict=True):
            self.scrape_age.labels(backend).set(age)
            self.up.labels(backend).set(1 if is_up else 0)
            self.outstanding.labels(backend).set(count)
        return generate_latest(self.registry)
