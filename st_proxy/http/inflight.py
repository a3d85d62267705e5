"""The requests the data port is handling right now, for the shutdown: wait until none is left, then cut the rest.

aiohttp's own ``AppRunner.cleanup`` waits for in-flight handlers too, but cancels what is left the same way a caller
hanging up does (``handler_cancellation``), so the handler could not tell the two apart, and in aiohttp 3.14 it waits
up to twice its timeout (``web_protocol.RequestHandler.shutdown``: once for the handler, once more after cancelling
the request's payload). ``server/serve.py`` waits here instead, marks the cut, and only then lets aiohttp cancel.
"""

from __future__ import annotations

import asyncio


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self.cut_off = False  # set by the shutdown just before it cancels what is still running
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """True when no request is left within ``seconds`` (0: do not wait)."""
        if self._idle.is_set():
            return True
        if seconds <= 0:
            return False
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True
