"""Prometheus metrics (docs/operations.md, "Metrics"). Every metric lives in the registry handed in: no global registry.

Label values are bounded so callers cannot grow the series count: ``tenant`` only ever holds a configured tenant id or
``none``, ``method`` a standard method or ``other``, ``kind`` / ``outcome`` / ``result`` their fixed sets. Label sets
with fixed values exist from the start for every configured tenant, so a dashboard sees a zero rather than a gap, and
``set_tenants`` (called again on reload) creates the series of added tenants and removes those of removed ones.

``/metrics`` is served from ``Metrics.exposition``: the registry without the ``_created`` series that
prometheus-client adds to every counter and histogram child. In the text format Prometheus ingests them as separate
gauge series (doubling the series count for no query anyone writes); dropping them in a view keeps us off
``prometheus_client.disable_created_metrics()``, a process-wide switch.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import __version__
from .client_metrics import ClientMetrics
from .text_format import gauge_lines

NO_TENANT = "none"
OTHER_METHOD = "other"
# 1 ms (a cached token, a tiny answer on loopback) to 120 s (upstream.read_timeout_seconds' default: a slow export).
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# 5 ms to 30 s: tokens.fetch_timeout_seconds defaults to 10 s; 30 s leaves room for a raised timeout.
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset")
TOKEN_OUTCOMES = ("success", "rejected", "error")
RELOAD_RESULTS = ("success", "failure")
# RFC 9110 section 9 plus PATCH (RFC 5789); anything else is counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class _LoopValue:
    """prometheus-client's ``MutexValue`` without its lock, and with slots.

    Every metric here is written from the event loop's one thread (the worker threads load configs, stat files and
    render /metrics, which only reads: a float is read whole under the GIL). So a lock per value bought nothing but a
    lock acquisition per ``inc`` and about 170 bytes per value: at 1,000 tenants with ``tenant_histograms``, ~39,000
    values, 6 MiB. Installed as prometheus-client's value class when this module is imported, unless its multiprocess
    mode (``PROMETHEUS_MULTIPROC_DIR``) chose a different one; ``text_format.py`` reads it through the same ``get``.
    """

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._value = 0.0
        self._exemplar: object = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: object) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> object:
        return self._exemplar


if prometheus_values.ValueClass is prometheus_values.MutexValue:
    prometheus_values.ValueClass = _LoopValue


def _observe(histogram: Histogram, value: float) -> None:
    """``Histogram.observe`` for a child without exemplars: the bucket found by bisection rather than a scan of
    every bound. The attributes are the ones text_format.py reads (tests/test_scale.py compares the two renderings)."""
    histogram._sum.inc(value)
    histogram._buckets[bisect.bisect_left(histogram._upper_bounds, value)].inc(1)


Expiries = Callable[[], Iterable[tuple[str, "float | None"]]]
EXPIRES_IN = "st_proxy_token_expires_in_seconds"


class _ExpiresIn(Collector):
    """``st_proxy_token_expires_in_seconds``, computed at scrape time: a stored gauge would be stale between events."""

    HELP = "Seconds until the tenant's current token expires; 0 when it has none or it has expired"

    def __init__(self, clock: Callable[[], float]) -> None:
        self.source: Expiries = lambda: ()
        self._clock = clock

    def describe(self):
        yield GaugeMetricFamily(EXPIRES_IN, "", labels=["tenant"])

    def _values(self) -> Iterator[tuple[str, float]]:
        now = self._clock()
        for tenant, expires_at in self.source():
            yield tenant, max(0.0, expires_at - now) if expires_at is not None else 0.0

    def collect(self):
        family = GaugeMetricFamily(EXPIRES_IN, self.HELP, labels=["tenant"])
        for tenant, value in self._values():
            family.add_metric([tenant], value)
        yield family

    def text_lines(self) -> Iterator[str]:
        """The same family for ``text_format.render``, without building a sample object per tenant."""
        return gauge_lines(EXPIRES_IN, self.HELP, "tenant", self._values())


class _WithoutCreated:
    """A registry view without ``_created`` samples; what ``make_aiohttp_handler`` is given."""

    _HAS_CREATED = frozenset({"counter", "histogram", "summary"})

    def __init__(self, source) -> None:
        self._source = source

    def collect(self):
        for family in self._source.collect():
            if family.type in self._HAS_CREATED:
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family

    def restricted_registry(self, names: Iterable[str]) -> _WithoutCreated:  # /metrics?name[]=...
        return _WithoutCreated(self._source.restricted_registry(names))


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
        tenant_histograms: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.exposition = _WithoutCreated(self.registry)
        self.tenant_histograms = tenant_histograms
        self._tenants: frozenset[str] = frozenset()
        # (method, code) pairs seen per tenant: removing a tenant on reload touches its own series only, so a reload
        # that removes many of 5,000 tenants stays linear.
        self._request_series: dict[str, set[tuple[str, str]]] = {}
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        histogram_labels = ["tenant"] if tenant_histograms else []
        self._more_fixed: list[Callable[[str], Iterable[tuple[object, tuple[str, ...]]]]] = []
        r = self.registry
        self.requests = Counter(
            "st_proxy_requests",
            "Requests answered on the data port, by tenant, method and status code",
            ["tenant", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "st_proxy_request_duration_seconds",
            "Time from receiving a request to the end of its answer",
            histogram_labels,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "st_proxy_upstream_errors",
            "Exchanges with the ServiceTitan API that failed (connect, timeout, reset)",
            ["tenant", "kind"],
            registry=r,
        )
        self.token_fetches = Counter(
            "st_proxy_token_fetches",
            "Token requests to the token endpoint, by outcome (success, rejected, error)",
            ["tenant", "outcome"],
            registry=r,
        )
        self.token_fetch_duration = Histogram(
            "st_proxy_token_fetch_duration_seconds",
            "Duration of one token request",
            histogram_labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.token_replays = Counter(
            "st_proxy_token_replays",
            "Requests replayed with a new token after an upstream 401",
            ["tenant"],
            registry=r,
        )
        self.in_flight = Gauge("st_proxy_in_flight_requests", "Requests being handled now", registry=r)
        self.config_reloads = Counter(
            "st_proxy_config_reloads", "Config reloads by result (success, failure)", ["result"], registry=r
        )
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        self.build_info = Gauge(
            "st_proxy_build_info", "Always 1; the version label says which build runs", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self._expires_in = _ExpiresIn(clock)
        r.register(self._expires_in)
        self.clients = ClientMetrics(r)  # st_proxy_client_auth_total, st_proxy_local_tokens_issued_total

    def watch_expiries(self, expiries: Expiries) -> None:
        """Where the scrape-time gauge reads ``(tenant id, expires_at or None)`` pairs from."""
        self._expires_in.source = expiries

    def set_tenants(self, tenant_ids: Iterable[str]) -> None:
        """Bound the tenant label to these ids: create added tenants' fixed series, remove removed tenants' series."""
        for _ in self._series_steps(tenant_ids):
            pass

    async def set_tenants_stepwise(self, tenant_ids: Iterable[str], *, batch: int = 200) -> None:
        """``set_tenants`` for a running proxy: the label bound changes at once, and the series are created and removed
        ``batch`` tenants at a time with the event loop free in between. A child costs ~5 us to create and each tenant
        has up to a dozen; a reload that adds 5,000 tenants would otherwise hold the loop for a fifth of a second."""
        for done, _ in enumerate(self._series_steps(tenant_ids), 1):
            if done % batch == 0:
                await asyncio.sleep(0)

    def _series_steps(self, tenant_ids: Iterable[str]) -> Iterator[None]:
        new = frozenset(tenant_ids)
        removed, added = self._tenants - new, new - self._tenants
        # First, before any step: requests label a removed tenant "none" and an added one by its id from here on (a
        # request for an added tenant creates its own series if it comes before its step).
        self._tenants = new
        self._request_children = {}  # labels change for added and removed tenants: found again on next use
        for tenant in removed:
            self._remove(tenant)
            yield
        for tenant in sorted(added):  # sorted: the exposition lists tenants in a stable order
            for metric, labels in self._fixed_series(tenant):
                metric.labels(*labels)
            yield

    def add_fixed_series(self, series: Callable[[str], Iterable[tuple[object, tuple[str, ...]]]]) -> None:
        """More per-tenant fixed series (a subsystem's own metrics, e.g. limits/metrics.py), created now for every
        configured tenant and kept in step with ``set_tenants``."""
        self._more_fixed.append(series)
        for tenant in sorted(self._tenants):
            for metric, labels in series(tenant):
                metric.labels(*labels)  # type: ignore[attr-defined]

    def _fixed_series(self, tenant: str):
        """Every per-tenant series with fixed label values (docs/operations.md: they exist from start, at zero)."""
        for more in self._more_fixed:
            yield from more(tenant)
        if self.tenant_histograms:
            yield self.request_duration, (tenant,)
            yield self.token_fetch_duration, (tenant,)
        yield self.token_replays, (tenant,)
        for kind in UPSTREAM_ERROR_KINDS:
            yield self.upstream_errors, (tenant, kind)
        for outcome in TOKEN_OUTCOMES:
            yield self.token_fetches, (tenant, outcome)

    def _remove(self, tenant: str) -> None:
        self._request_children = {}
        for metric, labels in self._fixed_series(tenant):
            metric.remove(*labels)
        for method, code in self._request_series.pop(tenant, ()):
            self.requests.remove(tenant, method, code)

    def tenant_label(self, tenant_id: str | None) -> str:
        return tenant_id if tenant_id in self._tenants else NO_TENANT

    # -- events --------------------------------------------------------------------------------------------------
    def request_done(self, tenant_id: str | None, method: str, status: int, seconds: float) -> None:
        # The children for this label set, found once: prometheus-client's labels() validates and joins the values
        # and takes the metric's lock on every call. The cache key is made of label values, so it is bounded as they
        # are (module docstring), and it is emptied whenever the tenant bound changes or a tenant's series go.
        key = (self.tenant_label(tenant_id), method if method in METHODS else OTHER_METHOD, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = self._new_request_children(*key)
        children[0].inc()
        _observe(children[1], seconds)

    def _new_request_children(self, tenant: str, method: str, status: int) -> tuple[Counter, Histogram]:
        code = str(status)
        self._request_series.setdefault(tenant, set()).add((method, code))
        return self.requests.labels(tenant, method, code), self._histogram(self.request_duration, tenant)

    def upstream_error(self, tenant_id: str | None, kind: str) -> None:
        if kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(self.tenant_label(tenant_id), kind).inc()

    def token_fetched(self, tenant_id: str, outcome: str, seconds: float) -> None:
        tenant = self.tenant_label(tenant_id)
        if outcome in TOKEN_OUTCOMES:
            self.token_fetches.labels(tenant, outcome).inc()
        self._histogram(self.token_fetch_duration, tenant).observe(seconds)

    def _histogram(self, histogram: Histogram, tenant: str) -> Histogram:
        """The tenant's child with ``metrics.tenant_histograms``, else the one unlabelled histogram."""
        return histogram.labels(tenant) if self.tenant_histograms else histogram

    def token_replayed(self, tenant_id: str) -> None:
        self.token_replays.labels(self.tenant_label(tenant_id)).inc()

    def config_reloaded(self, ok: bool) -> None:
        self.config_reloads.labels("success" if ok else "failure").inc()
