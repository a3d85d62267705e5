"""The running proxy's shared state, stored on both apps under one typed key (no globals)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from .metrics import Metrics
from .reload import ConfigHolder
from .tokens import TokenManager


@dataclass(eq=False)
class Runtime:
    holder: ConfigHolder
    metrics: Metrics
    clock: Callable[[], float] = time.time
    tokens: TokenManager | None = None  # set while the data app runs (its cleanup context)
    api_session: aiohttp.ClientSession | None = None
    token_session: aiohttp.ClientSession | None = None
    draining: bool = False
    prewarm_done: bool = field(default=False)

    def ready(self) -> bool:
        return self.tokens is not None and not self.pending_tenants()

    def pending_tenants(self) -> list[str]:
        """Configured tenants whose first token attempt has not finished yet."""
        if self.tokens is None:
            return sorted(self.holder.current.tenants)
        return [t.tenant_id for t in self.holder.current.tenants.values() if not self.tokens.entry(t).attempted.is_set()]


RUNTIME = web.AppKey("runtime", Runtime)
