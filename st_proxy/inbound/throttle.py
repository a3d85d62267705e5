"""Slowing down guesses: ten wrong secrets for one client name within a minute, then 429 until the minute is over.

Only configured client names are tracked (a name that is not configured has no secret to guess), so the state is
bounded by the config, whatever names callers make up. The right secret always works: the check runs only after a
secret turned out wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

WRONG_SECRETS_ALLOWED = 10
WINDOW_SECONDS = 60.0


class WrongSecretThrottle:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # client name -> (window start, wrong secrets in it)

    def retry_after(self, name: str) -> float | None:
        """Seconds until wrong secrets for ``name`` are answered again, or None when they are not throttled."""
        window = self._windows.get(name)
        if window is None:
            return None
        start, count = window
        left = start + WINDOW_SECONDS - self._clock()
        if left <= 0:
            del self._windows[name]
            return None
        return left if count >= WRONG_SECRETS_ALLOWED else None

    def wrong_secret(self, name: str) -> None:
        now = self._clock()
        start, count = self._windows.get(name, (now, 0))
        if now >= start + WINDOW_SECONDS:
            start, count = now, 0
        self._windows[name] = (start, count + 1)

    def retain(self, names: Iterable[str]) -> None:
        """Forget clients that are no longer configured (called when the config changes)."""
        keep = set(names)
        for name in [n for n in self._windows if n not in keep]:
            del self._windows[name]
