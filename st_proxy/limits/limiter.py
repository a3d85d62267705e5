"""The limit step of the request path (docs/limits.md), and what an upstream 429 does.

``Limiter.admit`` runs after the tenant is known and before the token step. Under one deadline
(``max_wait_seconds``) a request first takes a concurrency slot for its tenant in this process, then reserves a rate
slot in its budget if the wait for it fits what is left; it waits, checks again that no hold arrived meanwhile, and
goes. Past the deadline it gets 503 ``tenant_busy`` (no concurrency slot) or 429 ``rate_limited`` (no rate slot), both
with ``Retry-After``, and has reserved nothing. A caller that hangs up while it waits gives its slots back and never
sends.

``Admission.send`` sends through the handler's send function and watches for a 429 from ServiceTitan: it holds what
was throttled until the answer's ``Retry-After`` (shared through the state like the budget) and, for GET and HEAD
with ``retry_throttled``, waits that out and retries once if it fits the deadline; otherwise the 429 goes back as it
came.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from ..config import Config, Tenant
from ..config.limits import LimitsConfig
from ..errors import RateLimited, TenantBusy
from ..http.exchange import CallerGone
from ..ops.metrics import Metrics
from .budget import Rate, Verdict
from .keys import budget, retry_after
from .metrics import LimitMetrics
from .slots import ConcurrencySlots, Sleep
from .state import PacingState

BUSY_RETRY_AFTER = 1.0  # seconds: a concurrency slot frees as soon as any answer of the tenant has been relayed
MAX_RECHECKS = 8  # holds arriving one after another while a request waits: bounded, then the deadline decides
RETRYABLE = frozenset({"GET", "HEAD"})  # a 429 means the request was not processed; only safe methods are resent

Answer = tuple[aiohttp.ClientResponse, bytes]


class Unlimited:
    """``limits`` absent: nothing is paced and a 429 passes through."""

    async def send(self, send: Callable[[], Awaitable[Answer]], *, replayable: bool) -> Answer:
        return await send()

    def release(self) -> None:
        pass


UNLIMITED = Unlimited()


class Limiter:
    def __init__(
        self,
        state: PacingState,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        tenant_histograms: bool = True,
    ) -> None:
        self.state = state
        self._metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self._tenant_histograms = tenant_histograms
        self.slots = ConcurrencySlots(sleep)
        self.metrics: LimitMetrics | None = None
        state.on_up = self._state_up
        state.on_error = self._state_error

    def ensure_metrics(self) -> LimitMetrics:
        """The limits metrics: created at start when ``limits`` is configured, else by the first request paced after
        a reload turned ``limits`` on (the reloader does not know the limiter)."""
        if self.metrics is None:
            self.metrics = LimitMetrics(self._metrics, tenant_histograms=self._tenant_histograms)
            self.metrics.backend_up.set(1 if self.state.up else 0)
        return self.metrics

    def _state_up(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.backend_up.set(1 if up else 0)

    def _state_error(self) -> None:
        if self.metrics is not None:
            self.metrics.state_errors.inc()

    async def admit(self, request: web.Request, config: Config, tenant: Tenant) -> Admission | Unlimited:
        limits = config.limits
        if limits is None:
            return UNLIMITED
        key, rate = budget(request.method, request.path, tenant, limits)
        admission = Admission(self, request, limits, tenant.tenant_id, key, rate, self.clock())
        await admission.wait_for_slots()
        return admission


class Admission:
    """One request's slots: what it waited for, and what to give back when its answer has been relayed."""

    def __init__(
        self,
        limiter: Limiter,
        request: web.Request,
        limits: LimitsConfig,
        tenant: str,
        key: str,
        rate: Rate,
        now: float,
    ) -> None:
        self._limiter = limiter
        self._request = request
        self._limits = limits
        self._tenant = tenant
        self._key = key
        self._rate = rate
        self._started = now
        self._deadline = now + limits.max_wait_seconds
        self._slot = False
        self._metrics = limiter.ensure_metrics()

    def _remaining(self) -> float:
        return max(0.0, self._deadline - self._limiter.clock())

    def _caller_gone(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def wait_for_slots(self) -> None:
        cap = self._limits.max_concurrent_per_tenant
        limiter = self._limiter
        queued = False
        if cap is not None:
            queued = not limiter.slots.free(self._tenant, cap)
            if not await limiter.slots.acquire(self._tenant, cap, self._remaining()):
                self._metrics.rejected(self._tenant)
                raise TenantBusy(
                    f"tenant {self._tenant} already has {cap} requests in flight here; none finished in time",
                    tenant=self._tenant,
                    retry_after=BUSY_RETRY_AFTER,
                )
            self._slot = True
            if self._caller_gone():
                self.release()
                raise CallerGone()
        try:
            paced = await self._pace()
        except BaseException:
            self.release()
            raise
        waited = queued or paced  # only then did it wait: the clock moves a little for every request
        self._metrics.admitted(self._tenant, limiter.clock() - self._started if waited else 0.0)

    async def _pace(self) -> bool:
        """Reserve a rate slot and wait for it; raise RateLimited when none fits. True when it had to wait."""
        state = self._limiter.state
        waited = False
        for _ in range(MAX_RECHECKS):
            remaining = self._remaining()
            local = not state.up
            verdict = await state.reserve(self._key, self._rate, remaining)
            if not verdict.ok:
                self._refuse(verdict, remaining)
            if verdict.wait <= 0:
                return waited
            waited = True
            await self._sleep_on(verdict, local)
            # A 429 seen meanwhile (here or by another process) holds the budget: check before sending, so a queue
            # does not fire into a hold.
            if await state.held_for(self._key) <= 0:
                return waited
        self._refuse(Verdict(False, self._remaining() + 1), self._remaining())
        return waited

    async def _sleep_on(self, verdict: Verdict, local: bool) -> None:
        state = self._limiter.state
        try:
            await self._limiter.sleep(verdict.wait)
        except asyncio.CancelledError:
            await asyncio.shield(state.refund(self._key, self._rate, verdict, local=local))
            raise
        if self._caller_gone():
            await state.refund(self._key, self._rate, verdict, local=local)
            raise CallerGone()

    def _refuse(self, verdict: Verdict, remaining: float) -> None:
        self._metrics.rejected(self._tenant)
        raise RateLimited(
            f"tenant {self._tenant} is over its rate limit here; no slot within {self._limits.max_wait_seconds:g}s",
            tenant=self._tenant,
            retry_after=max(1.0, verdict.wait - remaining),
        )

    async def send(self, send: Callable[[], Awaitable[Answer]], *, replayable: bool) -> Answer:
        upstream, head = await send()
        if upstream.status != 429:
            return upstream, head
        await self._throttled(upstream)
        if not (self._limits.retry_throttled and replayable and self._request.method in RETRYABLE):
            return upstream, head
        state = self._limiter.state
        remaining = self._remaining()
        local = not state.up
        verdict = await state.reserve(self._key, self._rate, remaining)
        if not verdict.ok:
            return upstream, head  # the hold does not end in time: the caller gets the 429 as it came
        upstream.release()
        if verdict.wait > 0:
            await self._sleep_on(verdict, local)
        upstream, head = await send()
        if upstream.status == 429:
            await self._throttled(upstream)
        return upstream, head

    async def _throttled(self, upstream: aiohttp.ClientResponse) -> None:
        self._metrics.upstream_throttled(self._tenant)
        await self._limiter.state.hold(self._key, self._rate, retry_after(upstream.headers))

    def release(self) -> None:
        if self._slot:
            self._slot = False
            self._limiter.slots.release(self._tenant)
