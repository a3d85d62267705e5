"""GCRA (the generic cell rate algorithm) with reservations, and the in-process budgets.

A budget keeps one number, the theoretical arrival time (``tat``) of the next request in a perfectly spaced schedule:
a request may go at ``tat + interval - burst * interval`` or now, whichever is later. A request reserves its slot
(moves ``tat`` on by one interval) only when its wait fits what is left of its deadline; a refused request changes
nothing, so refusals never push later requests back.

A hold (after an upstream 429) stops the budget until its end and empties the burst there: the first request after
the hold goes at its end and the next ones one interval apart, so a queue does not fire all at once when it ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

SWEEP_EVERY = 4096  # reservations between two sweeps of budgets that no longer hold anything


@dataclass(frozen=True)
class Rate:
    per_second: float | None  # None: unpaced (only holds apply)
    burst: int = 1

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second if self.per_second else 0.0

    def scaled(self, fraction: float) -> Rate:
        """This rate at ``fraction`` of its speed and burst: one process's share while the shared state is away."""
        if self.per_second is None:
            return self
        return Rate(self.per_second * fraction, max(1, math.floor(self.burst * fraction)))


@dataclass(frozen=True)
class Verdict:
    ok: bool  # reserved; False: refused, nothing reserved
    wait: float  # seconds until the slot (refused: until the slot it would have had)
    mark: float | None = None  # what to give back if the request never goes (``refund``)


class _Budget:
    __slots__ = ("hold", "tat")

    def __init__(self, tat: float) -> None:
        self.tat = tat
        self.hold = 0.0


class LocalBudgets:
    """Budgets in this process only. Cheap at thousands of tenants: one small object per budget in use, swept when
    it holds nothing any more. Never blocks: every method returns at once."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._budgets: dict[str, _Budget] = {}
        self._since_sweep = 0

    def __len__(self) -> int:
        return len(self._budgets)

    def reserve(self, key: str, rate: Rate, max_wait: float) -> Verdict:
        now = self._clock()
        budget = self._budgets.get(key)
        interval = rate.interval
        tat = max(budget.tat, now) if budget else now
        new_tat = tat + interval
        send_at = max(now, new_tat - rate.burst * interval, budget.hold if budget else now)
        wait = send_at - now
        if wait > max_wait:
            return Verdict(False, wait)
        if budget is None:
            budget = self._budgets[key] = _Budget(new_tat)
            self._sweep(now)
        budget.tat = new_tat
        return Verdict(True, wait, new_tat)

    def hold(self, key: str, rate: Rate, seconds: float) -> None:
        now = self._clock()
        budget = self._budgets.setdefault(key, _Budget(now))
        end = now + seconds
        budget.hold = max(budget.hold, end)
        budget.tat = max(budget.tat, end + (rate.burst - 1) * rate.interval)

    def held_for(self, key: str) -> float:
        budget = self._budgets.get(key)
        return max(0.0, budget.hold - self._clock()) if budget else 0.0

    def refund(self, key: str, rate: Rate, mark: float | None) -> None:
        """Give a reserved slot back, if nothing was reserved after it (else the later ones keep their places)."""
        budget = self._budgets.get(key)
        if budget is not None and mark is not None and budget.tat == mark:
            budget.tat -= rate.interval

    def _sweep(self, now: float) -> None:
        self._since_sweep += 1
        if self._since_sweep < SWEEP_EVERY:
            return
        self._since_sweep = 0
        for key in [k for k, b in self._budgets.items() if b.tat <= now and b.hold <= now]:
            del self._budgets[key]
