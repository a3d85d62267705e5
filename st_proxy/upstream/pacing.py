"""Pacing token requests: at most ``tokens.prewarm_rate_per_second``, spaced evenly (docs/scaling.md).

ServiceTitan throttles its token endpoint, and a start or a rollout of every replica would otherwise send one token
request per tenant at once: thousands. Prewarm waits for its ``turn()``; a fetch someone is waiting for (a request for
a tenant not yet warmed, a refresh, a retry) never waits, but ``take()`` books its slot all the same, so prewarm
yields to it and the total stays at the rate.

Slots are spaced ``1 / rate`` apart with no burst allowance: a one-second window then never holds more than ``rate``
prewarm requests, plus whatever on-demand fetches pushed the schedule back by.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

Sleep = Callable[[float], Awaitable[object]]


class Pacer:
    def __init__(self, rate_per_second: float, *, clock: Callable[[], float], sleep: Sleep = asyncio.sleep) -> None:
        self.interval = 1.0 / rate_per_second
        self._clock = clock
        self._sleep = sleep
        self._next = -math.inf  # the earliest time the next request may go

    def take(self) -> None:
        """Book a slot for a request that goes now, whatever the schedule: later turns move back by one interval."""
        self._next = max(self._next, self._clock()) + self.interval

    async def turn(self) -> None:
        """Wait until a slot is free, then book it.

        After sleeping until the slot it waited for, a waiter takes that slot unless someone booked it meanwhile
        (``take`` or another waiter moved the schedule), without asking the clock again: so prewarm still goes at the
        rate, in real time, under a clock that does not move by itself (tests inject one).
        """
        while True:
            now = self._clock()
            slot = self._next
            if now >= slot:
                self._next = now + self.interval
                return
            await self._sleep(slot - now)
            if self._next == slot:
                self._next = slot + self.interval
                return
