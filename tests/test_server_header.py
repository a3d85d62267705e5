"""The proxy's own answers say ``Server: st-proxy`` and nothing about Python or aiohttp; a relayed answer keeps the
upstream's Server header, and gets ``st-proxy`` when the upstream sent none (instead of aiohttp's versioned default)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from conftest import T1, raw_server, sim_config

PATH = f"/crm/v2/tenant/{T1.tenant_id}/customers"


@pytest.fixture
async def bare_upstream() -> AsyncIterator[str]:
    """An API that answers without any Server header (aiohttp's own server always adds one)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()

    async with raw_server(answer) as url:
        yield url


async def test_problem_answers_say_st_proxy(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    for path in ("/crm/v2/tenant/999/customers", "/crm/v2/customers", f"/crm/v2/tenant/{T1.tenant_id}/%2e%2e/x"):
        async with proxy.session.get(proxy.url + path) as resp:
            assert resp.headers.get("X-ST-Proxy-Error"), path
            assert resp.headers.getall("Server") == ["st-proxy"], path


async def test_admin_answers_say_st_proxy(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    for path in ("/healthz", "/readyz", "/tenants", "/metrics", "/nothing-here"):
        async with proxy.session.get(proxy.admin_url + path) as resp:
            assert resp.headers.getall("Server") == ["st-proxy"], path


async def test_a_relayed_answer_without_a_server_header_gets_st_proxy(simulator, bare_upstream, start_proxy):
    proxy = await start_proxy(sim_config(simulator, api_url=bare_upstream), prewarm=False)
    async with proxy.session.get(proxy.url + PATH) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Server") == ["st-proxy"]


async def test_a_relayed_answer_keeps_the_upstreams_server_header(simulator, aiohttp_server, start_proxy):
    async def api(request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Server": "Microsoft-IIS/10.0"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", api)
    upstream = await aiohttp_server(app)
    proxy = await start_proxy(sim_config(simulator, api_url=str(upstream.make_url("")).rstrip("/")), prewarm=False)
    async with proxy.session.get(proxy.url + PATH) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Server") == ["Microsoft-IIS/10.0"]
