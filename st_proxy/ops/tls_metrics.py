"""Metrics about TLS (docs/tls.md): when the certificates in use expire, and what the forward proxy did with each
``CONNECT``.

The expiry gauge shows the certificate actually served, not the one on disk: when a renewal is refused (a broken or
mismatched pair), the old certificate stays in use and this gauge keeps its expiry, so an alert on it catches a
renewal that never took effect. Labels are fixed sets: ``certificate`` is ``data_port`` or ``forward_proxy_ca``,
``outcome`` one of ``OUTCOMES``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

OUTCOMES = ("intercepted", "tunnelled", "refused", "handshake_failed")


class TLSMetrics:
    def __init__(self, registry: CollectorRegistry, *, forward_proxy: bool) -> None:
        self.expiry = Gauge(
            "st_proxy_tls_certificate_expiry_timestamp_seconds",
            "When the certificate in use expires (Unix time): the data port's, or the forward proxy's local CA",
            ["certificate"],
            registry=registry,
        )
        self.connects = Counter(
            "st_proxy_forward_proxy_connects",
            "CONNECT requests to the forward proxy by outcome (intercepted, tunnelled, refused, handshake_failed)",
            ["outcome"],
            registry=registry,
        )
        if forward_proxy:
            for outcome in OUTCOMES:
                self.connects.labels(outcome)

    def certificate_expires(self, certificate: str, timestamp: float) -> None:
        self.expiry.labels(certificate).set(timestamp)

    def connect(self, outcome: str) -> None:
        self.connects.labels(outcome).inc()
