"""Where the budgets live: Redis while it answers in time, else this process alone at a share of the rate.

No request fails because of Redis. A Redis call that errors or takes longer than ``state.timeout_ms`` switches this
process to its own budgets at ``fallback_rate_fraction`` of every rate (1/N for N replicas keeps the sum within the
budget), logs the switch once, and stops asking Redis on the request path, so a slow Redis does not add its timeout to
every request. A background probe pings Redis until it answers, then the process returns to the shared budgets.
Holds are also kept locally, so one learnt just before Redis went away still applies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from .budget import LocalBudgets, Rate, Verdict

if TYPE_CHECKING:  # the redis package is imported only by a process that shares state (several MiB of RSS)
    from .redis_state import RedisBudgets

log = logging.getLogger("st_proxy.limits")

PROBE_SECONDS = 1.0
# What a failing or misbehaving Redis can raise: its errors, the socket's, our timeout, and a reply of the wrong shape.
FAILURES: tuple[type[BaseException], ...] = (OSError, TimeoutError, ValueError, TypeError)  # and RedisError: failures()


def failures() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, *FAILURES)


T = TypeVar("T")


class PacingState:
    def __init__(
        self,
        local: LocalBudgets,
        shared: RedisBudgets | None = None,
        *,
        timeout: float = 0.1,
        fallback_fraction: float = 1.0,
        probe_seconds: float = PROBE_SECONDS,
    ) -> None:
        self._local = local
        self._shared = shared
        self._failures = failures() if shared is not None else FAILURES
        self._timeout = timeout
        self._fraction = fallback_fraction
        self._probe_seconds = probe_seconds
        self._probe: asyncio.Task[None] | None = None
        self.up = True  # in-process state is always there
        self.on_up: Callable[[bool], None] = lambda up: None
        self.on_error: Callable[[], None] = lambda: None

    @property
    def shared(self) -> bool:
        return self._shared is not None

    async def start(self, shared: RedisBudgets) -> None:
        """Share the budgets through ``shared`` from now on. Checked once (bounded by the timeout): a process that
        starts while Redis is down paces alone until the probe finds it."""
        self._shared = shared
        self._failures = failures()
        if not await self._try(shared.ping):
            self._fall_back("at start")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self._shared is not None:
            await self._shared.close()

    # -- the budget operations ---------------------------------------------------------------------------------
    async def reserve(self, key: str, rate: Rate, max_wait: float) -> Verdict:
        shared = self._shared
        if shared is not None:
            if self.up:
                verdict = await self._call(lambda: shared.reserve(key, rate, max_wait))
                if verdict is not None:
                    return verdict
            rate = rate.scaled(self._fraction)
        return self._local.reserve(key, rate, max_wait)

    async def hold(self, key: str, rate: Rate, seconds: float) -> None:
        shared = self._shared
        self._local.hold(key, rate.scaled(self._fraction) if shared else rate, seconds)
        if shared is not None and self.up:
            await self._call(lambda: shared.hold(key, rate, seconds))

    async def held_for(self, key: str) -> float:
        shared = self._shared
        if shared is not None and self.up:
            found = await self._call(lambda: shared.held_for(key))
            if found is not None:
                return found
        return self._local.held_for(key)

    async def refund(self, key: str, rate: Rate, verdict: Verdict, *, local: bool) -> None:
        shared = self._shared
        if local or shared is None:
            self._local.refund(key, rate.scaled(self._fraction) if shared else rate, verdict.mark)
        elif self.up:
            await self._call(lambda: shared.refund(key, rate, verdict.mark))

    # -- Redis health ------------------------------------------------------------------------------------------
    async def _try(self, call: Callable[[], Awaitable[object]]) -> bool:
        try:
            await asyncio.wait_for(call(), self._timeout)
        except self._failures:
            self.on_error()
            return False
        return True

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await asyncio.wait_for(call(), self._timeout)
        except self._failures as exc:
            self.on_error()
            self._fall_back(type(exc).__name__)
            return None

    def _fall_back(self, why: str) -> None:
        if not self.up:
            return
        self.up = False
        self.on_up(False)
        log.warning(
            "state backend unreachable (%s): pacing in this process alone at %g of each rate until it is back",
            why,
            self._fraction,
            extra={"event": "state_backend_down", "fallback_rate_fraction": self._fraction},
        )
        self._probe = asyncio.create_task(self._wait_for_redis(), name="state-backend-probe")

    async def _wait_for_redis(self) -> None:
        assert self._shared is not None
        while not await self._try(self._shared.ping):  # noqa: ASYNC110 (polling a remote server, not an event)
            await asyncio.sleep(self._probe_seconds)
        self.up = True
        self.on_up(True)
        log.info("state backend reachable again: pacing with the shared budgets", extra={"event": "state_backend_up"})
