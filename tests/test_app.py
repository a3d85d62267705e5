"""create_app's wiring: what the sessions it builds do with real servers on loopback."""

from __future__ import annotations

from aiohttp import web

from conftest import T1, sim_config

ISSUED = "tok.from-a-gzipping-endpoint"


async def test_a_token_endpoint_that_compresses_its_answer_still_gives_a_usable_token(aiohttp_server, start_proxy):
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
    api_app = web.Application()
    api_app.router.add_route("*", "/{tail:.*}", api)
    auth_server, api_server = await aiohttp_server(auth), await aiohttp_server(api_app)
    config = sim_config(None, auth_url=str(auth_server.make_url("/connect/token")),
                        api_url=str(api_server.make_url("")).rstrip("/"))
    proxy = await start_proxy(config, prewarm=False)
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers") as resp:
        assert resp.status == 200, await resp.text()
    assert seen == [f"Bearer {ISSUED}"]
