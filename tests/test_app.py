"""create_app's wiring: what the sessions it builds do with real servers on loopback."""

from __future__ import annotations

import asyncio

from aiohttp import web
from conftest import T1, sim_config

ISSUED = "tok.from-a-gzipping-endpoint"


async def test_a_token_endpoint_that_compresses_its_answer_still_gives_a_usable_token(fake_upstream, start_proxy):
    # Token endpoints behind a CDN compress JSON whenever the request allows it; the API session keeps bodies as sent
    # (auto_decompress=False), but the token client must read the JSON, not the gzip bytes.
    async def token(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.json_response({"access_token": ISSUED, "expires_in": 900, "token_type": "Bearer"})
        response.enable_compression()  # gzip when the request's Accept-Encoding allows it
        return response

    seen: list[str] = []

    async def api(request: web.Request) -> web.Response:
        seen.append(request.headers["Authorization"])
        return web.json_response({"data": []})

    auth = web.Application()
    auth.router.add_post("/connect/token", token)
    config = sim_config(None, auth_url=await fake_upstream(auth) + "/connect/token", api_url=await fake_upstream(api))
    proxy = await start_proxy(config, prewarm=False)
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers") as resp:
        assert resp.status == 200, await resp.text()
    assert seen == [f"Bearer {ISSUED}"]


async def test_a_request_queued_behind_a_full_connection_pool_gets_a_timeout_not_an_endless_wait(
    fake_upstream, simulator, start_proxy
):
    # With every pooled connection busy, a queued request must not wait forever holding a token that may expire
    # meanwhile: upstream.connect_timeout_seconds bounds the wait for a connection too.
    release, holding = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        holding.set()
        await release.wait()
        return web.json_response({"data": []})

    config = sim_config(
        simulator,
        api_url=await fake_upstream(slow),
        upstream={"max_connections": 1, "connect_timeout_seconds": 0.2},
    )
    proxy = await start_proxy(config)
    url = f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers"

    first = asyncio.ensure_future(proxy.session.get(url))
    await holding.wait()
    async with asyncio.timeout(30):  # a safety bound so a regression fails instead of hanging, not a speed check
        async with proxy.session.get(url) as resp:
            assert resp.status == 504
            assert resp.headers["X-ST-Proxy-Error"] == "upstream_timeout"
    release.set()
    async with await first as resp:
        assert resp.status == 200
