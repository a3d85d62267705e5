"""Metrics about callers (docs/security.md): authentication results and local tokens issued, by client.

The ``client`` label only ever holds a configured client name or ``none`` (a caller that named no configured client),
so made-up names cannot grow the series count. Each configured client's series exist from the start, at zero.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter

NO_CLIENT = "none"
AUTH_RESULTS = ("ok", "unauthorized", "forbidden", "throttled")


class ClientMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.auth = Counter(
            "st_proxy_client_auth",
            "Data-port and token-endpoint requests by client and result (ok, unauthorized, forbidden, throttled)",
            ["client", "result"],
            registry=registry,
        )
        self.issued = Counter(
            "st_proxy_local_tokens_issued", "Local tokens issued by POST /connect/token", ["client"], registry=registry
        )
        self._names: frozenset[str] = frozenset()
        self.auth.labels(NO_CLIENT, "unauthorized")
        self.issued.labels(NO_CLIENT)  # placeholder tokens, when no clients are configured

    def set_clients(self, names: Iterable[str]) -> None:
        """Create added clients' series and remove removed clients' (called at start and on every reload)."""
        new = frozenset(names) - {NO_CLIENT}
        for name in self._names - new:
            for result in AUTH_RESULTS:
                self.auth.remove(name, result)
            self.issued.remove(name)
        for name in sorted(new - self._names):
            for result in AUTH_RESULTS:
                self.auth.labels(name, result)
            self.issued.labels(name)
        self._names = new

    def label(self, name: str | None) -> str:
        return name if name in self._names else NO_CLIENT

    def auth_result(self, name: str | None, result: str) -> None:
        self.auth.labels(self.label(name), result).inc()

    def token_issued(self, name: str | None) -> None:
        self.issued.labels(self.label(name)).inc()
