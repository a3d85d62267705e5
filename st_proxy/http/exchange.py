"""One request's bookkeeping: what the access log line and the metrics need to know when it ends."""

from __future__ import annotations

from collections.abc import Callable

CALLER_GONE = 499  # nginx's "client closed request": logged and counted, never sent (nobody is listening)


class CallerGone(Exception):
    """The caller hung up before the exchange finished. Not a ProxyError: there is nobody left to answer."""


class Exchange:
    """Filled in by the steps of the request path as they run; read once, when the request ends."""

    __slots__ = (
        "answering",
        "bytes",
        "claimed",
        "client",
        "error",
        "release",
        "request_id",
        "status",
        "tenant",
        "trace_id",
        "upstream_ms",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.tenant: str | None = None  # set once routing settles on one tenant
        self.status = 500
        self.error: str | None = None
        self.upstream_ms: float | None = None
        self.bytes = 0
        self.trace_id: str | None = None
        self.answering = False  # the answer's status line has gone to the caller: no other answer can follow
        self.client: str | None = None  # the authenticated client's name (docs/security.md)
        self.claimed: str | None = None  # a configured client name the caller presented, authenticated or not
        self.release: Callable[[], None] | None = None  # what the request holds until it ends (a concurrency slot)
