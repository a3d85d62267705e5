"""An upstream error body the proxy peeks into (for ServiceTitan's traceId, or to classify a 401) may be any bytes:
JSON nested deeper than Python's decoder can follow raises RecursionError, not ValueError. Such an answer is relayed
as it came, never turned into a 500 or a cut connection."""

from __future__ import annotations

import pytest
from aiohttp import web
from conftest import T1, sim_config

PATH = f"/crm/v2/tenant/{T1.tenant_id}/customers"
NESTED = b"[" * 200_000


@pytest.mark.parametrize("status", [401, 404, 500])
async def test_a_deeply_nested_json_error_body_is_relayed_as_it_came(simulator, aiohttp_server, start_proxy, status):
    async def api(request: web.Request) -> web.Response:
        return web.Response(status=status, body=NESTED, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api)
    upstream = await aiohttp_server(app)
    proxy = await start_proxy(sim_config(simulator, api_url=str(upstream.make_url("")).rstrip("/")), prewarm=False)
    async with proxy.session.get(proxy.url + PATH) as resp:
        assert resp.status == status
        assert "X-ST-Proxy-Error" not in resp.headers
        assert await resp.read() == NESTED
