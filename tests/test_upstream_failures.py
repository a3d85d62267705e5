"""When ServiceTitan or its token endpoint fails, the caller gets the proxy's problem answer (docs/errors.md), and the proxy stays healthy for the next request."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from conftest import T1, raw_server, sim_config

TENANT_PATH = f"/crm/v2/tenant/{T1.tenant_id}"


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


async def problem(resp: aiohttp.ClientResponse, code: str, status: int) -> dict:
    assert resp.status == status
    assert resp.headers["X-ST-Proxy-Error"] == code
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type="application/problem+json")
    assert body["status"] == status
    assert body["tenant"] == T1.tenant_id
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body


async def get(proxy, path: str = "/customers") -> aiohttp.ClientResponse:
    return await proxy.session.get(f"{proxy.url}{TENANT_PATH}{path}")


async def test_an_api_that_refuses_connections_gives_502_upstream_unreachable(simulator, dead_port, start_proxy):
    proxy = await start_proxy(sim_config(simulator, api_url=f"http://127.0.0.1:{dead_port}"))
    async with await get(proxy) as resp:
        body = await problem(resp, "upstream_unreachable", 502)
    assert "ServiceTitan" in body["detail"]
    assert (
        proxy.registry.get_sample_value("st_proxy_upstream_errors_total", {"tenant": T1.tenant_id, "kind": "connect"})
        == 1
    )


async def test_an_api_slower_than_the_read_timeout_gives_504_upstream_timeout(simulator, start_proxy):
    simulator.api_delay = 3600  # far beyond the proxy's read timeout: the proxy's own timeout is what answers
    proxy = await start_proxy(sim_config(simulator, upstream={"read_timeout_seconds": 0.2}))
    async with await get(proxy) as resp:
        await problem(resp, "upstream_timeout", 504)
    assert (
        proxy.registry.get_sample_value("st_proxy_upstream_errors_total", {"tenant": T1.tenant_id, "kind": "timeout"})
        == 1
    )
    simulator.api_delay = 0
    async with await get(proxy) as resp:
        assert resp.status == 200


@pytest.fixture
async def broken_api(fake_upstream) -> str:
    """An API that promises 1000 bytes, sends 100, and hangs up; or answers something that is not HTTP."""

    async def dies_mid_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"x" * 100)
        request.transport.close()  # close() still flushes the 100 bytes; abort() might not
        return response

    async def fine(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get(f"{TENANT_PATH}/dies", dies_mid_body)
    app.router.add_get(f"{TENANT_PATH}/fine", fine)
    return await fake_upstream(app)


async def test_an_api_that_dies_mid_body_gives_the_caller_a_broken_answer_not_a_complete_one(
    simulator, broken_api, start_proxy
):
    proxy = await start_proxy(sim_config(simulator, api_url=broken_api))
    async with await get(proxy, "/dies") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert (
        proxy.registry.get_sample_value("st_proxy_upstream_errors_total", {"tenant": T1.tenant_id, "kind": "reset"})
        == 1
    )
    async with await get(proxy, "/fine") as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}


async def test_an_api_answering_garbage_gives_502_upstream_unreachable(simulator, start_proxy):
    async def not_http(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_server(not_http) as api_url:
        proxy = await start_proxy(sim_config(simulator, api_url=api_url))
        async with await get(proxy) as resp:
            await problem(resp, "upstream_unreachable", 502)


async def test_a_token_endpoint_that_refuses_connections_gives_503_token_unavailable_with_retry_after(
    simulator, dead_port, start_proxy
):
    proxy = await start_proxy(
        sim_config(auth_url=f"http://127.0.0.1:{dead_port}/connect/token", api_url=simulator.base_url),
        prewarm=False,
    )
    async with await get(proxy) as resp:
        body = await problem(resp, "token_unavailable", 503)
        assert int(resp.headers["Retry-After"]) >= 1
    assert "connect" in body["detail"]
    assert simulator.api_requests == 0


async def test_a_wrong_client_secret_gives_502_token_rejected_naming_the_oauth_error(simulator, start_proxy):
    simulator.set_secret(T1.tenant_id, "cs1.rotated-by-the-tenant-admin")
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    async with await get(proxy) as resp:
        body = await problem(resp, "token_rejected", 502)
    assert "invalid_client" in body["detail"]
    assert "Retry-After" not in resp.headers
    assert simulator.api_requests == 0
