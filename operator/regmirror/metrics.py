"""Prometheus metrics of the operator, in one place (tests pass a registry of their own)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The operator's counters and gauges, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        # One label only: dashboards (and a test) read regmirror_reconciles_total{outcome="success"}.
        self.reconciles = Counter("regmirror_reconciles_total", "Reconciles by outcome.", ["outcome"], registry=registry)
        self.reconcile_seconds = Histogram(
            "regmirror_reconcile_duration_seconds", "Time one reconcile took, by concern.", ["concern"], registry=registry
        )
        self.writes = Counter("regmirror_api_writes_total", "API writes by kind of object and verb.", ["kind", "verb"], registry=registry)
        self.api_retries = Counter("regmirror_api_retries_total", "API requests retried after 429, 5xx or a timeout.", registry=registry)
        self.api_waits = Histogram(
            "regmirror_api_wait_seconds",
            "How long API requests waited for a place among the operator's requests in flight (api_max_in_flight); "
            "only requests that had to wait.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        # As client-go's workqueue_queue_duration_seconds: from the moment a key could be worked on (added, or its
        # requeue time came) until a worker took it.
        self.queue_wait = Histogram(
            "regmirror_queue_wait_seconds",
            "How long a key ready to be worked on waited for a worker, by concern.",
            ["concern"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        # As client-go's workqueue_depth: keys ready to be worked on now. A key queued for later (a requeue-after, a
        # backoff, a periodic recheck) counts in regmirror_queue_scheduled until its time comes, so an idle operator
        # reads 0 here although some key always waits for its next look.
        self.queue_depth = Gauge("regmirror_queue_depth", "Keys ready to be worked on now.", registry=registry)
        self.queue_scheduled = Gauge("regmirror_queue_scheduled", "Keys queued for a later time.", registry=registry)
        self.mirrors = Gauge("regmirror_mirrors", "RegistryMirrors known to the operator.", registry=registry)
        self.mirrors_ready = Gauge("regmirror_mirrors_ready", "RegistryMirrors whose Ready condition is True.", registry=registry)
        self.watch_restarts = Counter(
            "regmirror_watch_restarts_total", "Watches re-listed after an error or an expired resourceVersion.", ["kind"], registry=registry
        )
        self.leader = Gauge(
            "regmirror_leader", "1 while this replica holds the leader Lease and runs the controller, else 0.", registry=registry
        )
