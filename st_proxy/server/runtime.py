"""The running proxy's shared state, stored on both apps under one typed key (no globals)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from ..config import Config
from ..http.inflight import InFlight
from ..ops.metrics import Metrics
from ..upstream.tokens import TokenManager
from .reload import ConfigHolder


@dataclass(eq=False)
class Runtime:
    holder: ConfigHolder
    metrics: Metrics
    clock: Callable[[], float] = time.time
    tokens: TokenManager | None = None  # set while the data app runs (its cleanup context)
    api_session: aiohttp.ClientSession | None = None
    token_session: aiohttp.ClientSession | None = None
    draining: bool = False
    started: bool = False  # ready once: every tenant's first token attempt finished, or the prewarm bound passed
    ready_by: float | None = None  # clock time when readiness stops waiting for prewarm (tokens.prewarm_ready_seconds)
    in_flight: InFlight = field(default_factory=InFlight)  # data-port requests being handled, for the shutdown

    @property
    def config(self) -> Config:
        """The current config; a request reads it once and keeps it, even if a reload swaps it meanwhile."""
        return self.holder.current

    def ready(self) -> bool:
        """Ready once the first token attempt for every tenant has finished, success or not, or once
        ``tokens.prewarm_ready_seconds`` have passed since start-up, whichever comes first.

        With thousands of tenants and a paced prewarm the attempts take minutes; the rest go on in the background and
        a request for a tenant not yet warmed fetches its token at once. A latch: a tenant added later by a reload is
        prewarmed in the background but does not take the whole proxy out of its load balancer while that happens.
        """
        if self.started or self.tokens is None:
            return self.started
        if self.ready_by is not None and self.clock() >= self.ready_by:
            self.started = True
        else:
            tokens = self.tokens
            # Stops at the first tenant still pending: prewarm goes in config order, so that is usually an early one.
            self.started = all(tokens.attempted(t) for t in self.holder.current.tenants.values())
        return self.started

    def pending_tenants(self) -> list[str]:
        """Configured tenants whose first token attempt has not finished yet."""
        tenants = self.holder.current.tenants
        if self.tokens is None:
            return sorted(tenants)
        return sorted(t.tenant_id for t in tenants.values() if not self.tokens.attempted(t))


RUNTIME = web.AppKey("runtime", Runtime)
