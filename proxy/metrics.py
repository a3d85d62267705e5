"""Prometheus metrics (design.md section 1). Every metric lives in the registry handed in: no global registry.

The tenant label only ever holds a configured tenant id or ``none``; label sets with fixed values exist from the
start for every configured tenant, so a dashboard sees a zero rather than a gap.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__

NO_TENANT = "none"
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset")
TOKEN_OUTCOMES = ("success", "rejected", "error")
# RFC 9110 section 9 plus PATCH (RFC 5789); anything else is counted as "other" so callers cannot grow the label set.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class _ExpiresIn(Collector):
    """``st_proxy_token_expires_in_seconds``, computed at scrape time from the token cache."""

    def __init__(self, expiries: Callable[[], Iterable[tuple[str, float | None]]], clock: Callable[[], float]) -> None:
        self._expiries = expiries
        self._clock = clock

    def collect(self):
        family = GaugeMetricFamily(
            "st_proxy_token_expires_in_seconds",
            "Seconds until the tenant's current token expires (negative or 0 when it has none)",
            labels=["tenant"],
        )
        now = self._clock()
        for tenant, expires_at in self._expiries():
            family.add_metric([tenant], (expires_at - now) if expires_at is not None else 0.0)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._tenants: frozenset[str] = frozenset()
        r = self.registry
        self.requests = Counter("st_proxy_requests", "Requests answered", ["tenant", "method", "code"], registry=r)
        self.request_duration = Histogram(
            "st_proxy_request_duration_seconds", "Time from request to the end of the answer", ["tenant"],
            buckets=REQUEST_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter(
            "st_proxy_upstream_errors", "Failed upstream exchanges", ["tenant", "kind"], registry=r
        )
        self.token_fetches = Counter(
            "st_proxy_token_fetches", "Token requests by outcome", ["tenant", "outcome"], registry=r
        )
        self.token_fetch_duration = Histogram(
            "st_proxy_token_fetch_duration_seconds", "Token request duration", ["tenant"],
            buckets=TOKEN_BUCKETS, registry=r,
        )
        self.token_replays = Counter(
            "st_proxy_token_replays", "Requests replayed with a new token after an upstream 401", ["tenant"],
            registry=r,
        )
        self.in_flight = Gauge("st_proxy_in_flight_requests", "Requests being handled", registry=r)
        self.config_reloads = Counter("st_proxy_config_reloads", "Config reloads by result", ["result"], registry=r)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.build_info = Gauge("st_proxy_build_info", "Build information", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)

    def watch_expiries(self, expiries: Callable[[], Iterable[tuple[str, float | None]]]) -> None:
        self.registry.register(_ExpiresIn(expiries, self._clock))

    def set_tenants(self, tenant_ids: Iterable[str]) -> None:
        """Bound the tenant label to these ids and create their fixed-value series."""
        self._tenants = frozenset(tenant_ids)
        for tenant in self._tenants:
            self.request_duration.labels(tenant)
            self.token_fetch_duration.labels(tenant)
            self.token_replays.labels(tenant)
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(tenant, kind)
            for outcome in TOKEN_OUTCOMES:
                self.token_fetches.labels(tenant, outcome)

    def tenant_label(self, tenant_id: str | None) -> str:
        return tenant_id if tenant_id in self._tenants else NO_TENANT

    # -- events --------------------------------------------------------------------------------------------------
    def request_done(self, tenant_id: str | None, method: str, status: int, seconds: float) -> None:
        tenant = self.tenant_label(tenant_id)
        self.requests.labels(tenant, method if method in METHODS else "other", str(status)).inc()
        self.request_duration.labels(tenant).observe(seconds)

    def upstream_error(self, tenant_id: str | None, kind: str) -> None:
        self.upstream_errors.labels(self.tenant_label(tenant_id), kind).inc()

    def token_fetched(self, tenant_id: str, outcome: str, seconds: float) -> None:
        tenant = self.tenant_label(tenant_id)
        self.token_fetches.labels(tenant, outcome).inc()
        self.token_fetch_duration.labels(tenant).observe(seconds)

    def token_replayed(self, tenant_id: str) -> None:
        self.token_replays.labels(self.tenant_label(tenant_id)).inc()
