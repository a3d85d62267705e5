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
    started: bool = False  # every configured tenant's first token attempt has finished once
    in_flight: InFlight = field(default_factory=InFlight)  # data-port requests being handled, for the shutdown

    @property
    def config(self) -> Config:
        """The current config; a request reads it once and keeps it, even if a reload swaps it meanwhile."""
        return self.holder.current

    def ready(self) -> bool:
        """Ready once the first token attempt for every tenant has finished, success or not (docs/tokens.md).

        A latch: a tenant added later by a reload is prewarmed in the background but does not take the whole proxy
        out of its load balancer while that happens; its requests wait on the token like any cold request.
        """
        if not self.started and self.tokens is not None and not self.pending_tenants():
            self.started = True
        return self.started

    def pending_tenants(self) -> list[str]:
        """Configured tenants whose first token attempt has not finished yet."""
        tenants = self.holder.current.tenants
        if self.tokens is None:
            return sorted(tenants)
        return sorted(t.tenant_id for t in tenants.values() if not self.tokens.attempted(t))


RUNTIME = web.AppKey("runtime", Runtime)
