"""The held 401 answer is released on every path of the replay, cancellation included (st_proxy/http/replay.py).

A fake ServiceTitan on loopback answers the API with a 401 whose body is larger than the proxy reads to classify it,
then holds the rest: the proxy keeps that answer (and its pooled connection) while it waits for a fresh token. The
fake notices, through aiohttp's handler cancellation, when the proxy lets the connection go.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from conftest import T1, sim_config

from st_proxy.http.replay import ERROR_BODY_LIMIT

DEADLINE = 10.0  # seconds: a bound on waiting for an event, never a timing assertion
PATH = f"/crm/v2/tenant/{T1.tenant_id}/customers"


class HeldUpstream:
    """Token endpoint plus API. The first token comes at once; the second waits for ``token_gate``."""

    def __init__(self) -> None:
        self.tokens_asked = 0
        self.second_token_asked = asyncio.Event()
        self.token_gate = asyncio.Event()
        self.api_connection_closed = asyncio.Event()

    async def token(self, request: web.Request) -> web.Response:
        self.tokens_asked += 1
        if self.tokens_asked > 1:
            self.second_token_asked.set()
            await self.token_gate.wait()
        return web.json_response({"access_token": f"token-{self.tokens_asked}", "expires_in": 900})

    async def api(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=401, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b" " * (ERROR_BODY_LIMIT + 1024))  # more than the proxy reads before deciding
        try:
            await asyncio.Event().wait()  # the rest never comes: only the proxy letting go ends this
        except asyncio.CancelledError:
            self.api_connection_closed.set()
            raise
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/connect/token", self.token)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app


async def test_a_caller_hanging_up_while_the_fresh_token_is_awaited_releases_the_held_401(aiohttp_server, start_proxy):
    upstream = HeldUpstream()
    server = await aiohttp_server(upstream.app())  # aiohttp's test server cancels a handler whose caller left
    base = str(server.make_url("")).rstrip("/")
    proxy = await start_proxy(sim_config(api_url=base, auth_url=base + "/connect/token"), prewarm=False)
    try:
        caller = asyncio.create_task(proxy.session.get(proxy.url + PATH))
        await asyncio.wait_for(upstream.second_token_asked.wait(), DEADLINE)  # the 401 is held, the replay waits
        caller.cancel()  # the caller hangs up: the proxy's handler is cancelled while it awaits the fresh token
        await asyncio.gather(caller, return_exceptions=True)
        await asyncio.wait_for(upstream.api_connection_closed.wait(), DEADLINE)
    finally:
        upstream.token_gate.set()
