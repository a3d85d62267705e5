"""The metrics that exist when ``limits`` is configured (docs/limits.md). Labels are bounded like the rest: ``tenant``
is a configured tenant id or ``none`` (``Metrics.tenant_label``), ``outcome`` is ``delayed`` or ``rejected``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..ops.metrics import Metrics

OUTCOMES = ("delayed", "rejected")
# 1 ms to max_wait_seconds' usual range; a wait is at most the deadline (default 5 s) or a retried 429's hold.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class LimitMetrics:
    def __init__(self, metrics: Metrics, *, tenant_histograms: bool = True) -> None:
        r = metrics.registry
        self._metrics = metrics
        self._tenant_histograms = tenant_histograms
        self.rate_limited = Counter(
            "st_proxy_rate_limited",
            "Requests the proxy paced: delayed (waited for a slot) or rejected (429 rate_limited, 503 tenant_busy)",
            ["tenant", "outcome"],
            registry=r,
        )
        self.wait = Histogram(
            "st_proxy_rate_limit_wait_seconds",
            "Time a paced request waited for its concurrency and rate slots",
            ["tenant"] if tenant_histograms else [],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.throttled = Counter("st_proxy_upstream_throttled", "429 answers from ServiceTitan", ["tenant"], registry=r)
        self.backend_up = Gauge(
            "st_proxy_state_backend_up",
            "1 while the pacing state is reachable (always 1 for in-process state); 0 while pacing alone",
            registry=r,
        )
        self.backend_up.set(1)
        self.state_errors = Counter(
            "st_proxy_state_errors", "Calls to the shared state (Redis) that failed or timed out", registry=r
        )
        metrics.add_fixed_series(self._fixed_series)

    def _fixed_series(self, tenant: str):
        for outcome in OUTCOMES:
            yield self.rate_limited, (tenant, outcome)
        yield self.throttled, (tenant,)
        if self._tenant_histograms:
            yield self.wait, (tenant,)

    def admitted(self, tenant_id: str, waited: float) -> None:
        tenant = self._metrics.tenant_label(tenant_id)
        if waited > 0:
            self.rate_limited.labels(tenant, "delayed").inc()
        (self.wait.labels(tenant) if self._tenant_histograms else self.wait).observe(waited)

    def rejected(self, tenant_id: str) -> None:
        self.rate_limited.labels(self._metrics.tenant_label(tenant_id), "rejected").inc()

    def upstream_throttled(self, tenant_id: str) -> None:
        self.throttled.labels(self._metrics.tenant_label(tenant_id)).inc()
