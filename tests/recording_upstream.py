"""A ServiceTitan stand-in for the limits tests: a token endpoint that accepts any client, and an API that records
every arrival (the loop's monotonic time, method and path) and answers 200, or 429 while told to.

It runs on loopback in the test's own event loop; the proxy processes reach it over real sockets.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Arrival:
    at: float  # time.monotonic()
    method: str
    path: str
    caller: str = ""  # the caller's X-Caller header (passed through by the proxy like any header)


@dataclass
class RecordingUpstream:
    arrivals: list[Arrival] = field(default_factory=list)
    # Answers to give before the normal 200s: (status, headers, body), taken one per request.
    queued: collections.deque[tuple[int, dict[str, str], bytes]] = field(default_factory=collections.deque)
    throttle_all: dict[str, str] | None = None  # while set: every API request gets 429 with these headers
    gate: asyncio.Event | None = None  # paths containing "slow" wait for it before answering (slow exports)
    base_url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/connect/token", self._token)
        app.router.add_route("*", "/{tail:.*}", self._api)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def auth_url(self) -> str:
        return self.base_url + "/connect/token"

    def paths(self) -> list[str]:
        return [a.path for a in self.arrivals]

    def per_second(self, since: float, until: float, caller_prefix: str = "") -> list[int]:
        """Arrivals in [since, until) counted in whole one-second buckets (a partial last second is left out)."""
        counts: collections.Counter[int] = collections.Counter(
            int(a.at - since) for a in self.arrivals if since <= a.at < until and a.caller.startswith(caller_prefix)
        )
        return [counts.get(i, 0) for i in range(int(until - since))]

    async def _token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "upstream-token", "expires_in": 900, "token_type": "Bearer"})

    async def _api(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(
            Arrival(time.monotonic(), request.method, request.path_qs, request.headers.get("X-Caller", ""))
        )
        if self.gate is not None and "slow" in request.path:
            await self.gate.wait()
        if self.queued:
            status, headers, body = self.queued.popleft()
            return web.Response(status=status, headers=headers, body=body)
        if self.throttle_all is not None:
            return web.Response(status=429, headers=self.throttle_all, text='{"title":"Too Many Requests"}')
        return web.json_response({"data": [], "path": request.path})
