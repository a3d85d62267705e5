"""Per-process concurrency slots per tenant: one tenant's slow exports never hold every upstream connection.

A slot is taken before the rate slot and held until the answer's body has been relayed. Waiters are served first
come, first served; one whose deadline passes or whose caller hangs up leaves the queue without a trace.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

Sleep = Callable[[float], Awaitable[None]]


class _Tenant:
    __slots__ = ("limit", "used", "waiters")

    def __init__(self, limit: int) -> None:
        self.used = 0
        self.limit = limit
        self.waiters: deque[asyncio.Future[None]] = deque()


class ConcurrencySlots:
    def __init__(self, sleep: Sleep = asyncio.sleep) -> None:
        self._sleep = sleep
        self._tenants: dict[str, _Tenant] = {}

    def in_use(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.used if state else 0

    def free(self, tenant: str, limit: int) -> bool:
        """Would ``acquire`` succeed at once?"""
        state = self._tenants.get(tenant)
        return state is None or (state.used < limit and not state.waiters)

    async def acquire(self, tenant: str, limit: int, within: float) -> bool:
        """Take a slot within ``within`` seconds: True, or False when none came in time (nothing is held then)."""
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant(limit)
        state.limit = limit  # a reload may have changed it
        if state.used < limit and not state.waiters:
            state.used += 1
            return True
        if within <= 0:
            self._forget(tenant, state)
            return False
        handed = asyncio.get_running_loop().create_future()
        state.waiters.append(handed)
        timer = asyncio.ensure_future(self._sleep(within))
        try:
            await asyncio.wait((handed, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.release(tenant)  # a slot came just as the caller left: pass it on
            raise
        finally:
            timer.cancel()
            if not handed.done():
                handed.cancel()
                state.waiters.remove(handed)
                self._forget(tenant, state)
        return handed.done() and not handed.cancelled()

    def release(self, tenant: str) -> None:
        state = self._tenants.get(tenant)
        if state is None:
            return
        if state.used <= state.limit:
            while state.waiters:
                waiter = state.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the slot passes to the waiter: `used` stays the same
                    return
        state.used -= 1
        self._forget(tenant, state)

    def _forget(self, tenant: str, state: _Tenant) -> None:
        if state.used <= 0 and not state.waiters:
            self._tenants.pop(tenant, None)
