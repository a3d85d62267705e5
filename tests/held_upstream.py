"""A fake ServiceTitan for the real-process tests: tokens at once, API answers held until the test lets go.

Started as an aiohttp test server, which cancels a handler when its caller (the proxy) closes the connection: that
cancellation is how these tests see, from the upstream's side, that the proxy let an exchange go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import T1
from serve_process import ServeProcess, poll_until, write_config

from st_proxy.devtools.simulator import DEMO_APP_KEY

DEADLINE = 20.0  # seconds: a bound on waiting for an event, never a timing assertion
PATH = f"/crm/v2/tenant/{T1.tenant_id}/export/jobs"


class HeldUpstream:
    def __init__(self) -> None:
        self.arrived = asyncio.Event()  # an API request reached the upstream
        self.let_go = asyncio.Event()  # the proxy closed that request's connection (handler cancelled)
        self.release = asyncio.Event()  # the test lets the held answers finish
        self.first_chunk = False  # send the status line and one chunk before holding

    async def token(self, request: web.Request) -> web.Response:
        return web.json_response({"access_token": "held-token", "expires_in": 900})

    async def api(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        try:
            if self.first_chunk:
                await response.prepare(request)
                await response.write(b"first\n")
            self.arrived.set()
            await self.release.wait()
        except asyncio.CancelledError:
            self.let_go.set()
            raise
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof(b"last\n")
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/connect/token", self.token)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app


@pytest.fixture
async def held(aiohttp_server) -> AsyncIterator[tuple[HeldUpstream, str]]:
    upstream = HeldUpstream()
    server = await aiohttp_server(upstream.app())
    yield upstream, str(server.make_url("")).rstrip("/")
    upstream.release.set()  # nothing may stay parked when the server closes


@pytest.fixture
async def serve_held(tmp_path: Path, held) -> AsyncIterator:
    """Start a real `st-proxy serve` in front of ``held``; waits until it is ready."""
    children: list[ServeProcess] = []

    async def start(**sections: object) -> ServeProcess:
        base = held[1]
        config = write_config(
            tmp_path, auth_url=base + "/connect/token", api_url=base, tenants=[T1], app_key=DEMO_APP_KEY, **sections
        )
        child = await ServeProcess.start(config)
        children.append(child)
        await poll_until(lambda: ready(child), what="readiness")
        return child

    yield start
    for child in children:
        await child.close()


async def ready(child: ServeProcess) -> bool:
    async with aiohttp.ClientSession() as session, session.get(child.admin_url + "/readyz") as resp:
        return resp.status == 200


def access_lines(child: ServeProcess) -> list[dict]:
    return [e for e in child.events if e.get("logger") == "st_proxy.access"]


async def access_line(child: ServeProcess) -> dict:
    """The first access line the child logs (waiting for it)."""

    async def found() -> dict | None:
        lines = access_lines(child)
        return lines[0] if lines else None

    return await poll_until(found, deadline=DEADLINE, what="an access log line")
