"""The data port's two serving layers behave alike (docs/serving-layer.md): `st-proxy serve` serves create_app's objects
through the low-level web.Server (server/data_port.DataRunner), and the Application can still be served through its
router. What the router did for free (100-continue, CONNECT and `*` targets reaching the handler, the app's
on_response_prepare signal) must hold on both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import T1, DataTestServer, base_url, raw_exchange, sim_config
from prometheus_client import CollectorRegistry

from st_proxy.server.app import RUNTIME, create_app
from st_proxy.server.data_port import DataRunner

LAYERS = ["application router", "low-level web.Server"]
PATH = f"/crm/v2/tenant/{T1.tenant_id}/customers"


@pytest.fixture(params=LAYERS)
async def serve_app(request) -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """``await serve_app(app)``: the data app on loopback through one of the two layers; its base URL."""
    servers: list[TestServer] = []

    async def serve(app: web.Application) -> str:
        server = TestServer(app) if request.param == "application router" else DataTestServer(app)
        servers.append(server)
        await server.start_server()
        return base_url(server)

    yield serve
    while servers:
        await servers.pop().close()


def data_app(simulator) -> web.Application:
    return create_app(sim_config(simulator), registry=CollectorRegistry(), environ={}, prewarm=False)


async def test_a_request_is_forwarded_and_the_apps_response_prepare_signal_runs(serve_app, simulator):
    app = data_app(simulator)
    prepared: list[int] = []

    async def hook(request: web.BaseRequest, response: web.StreamResponse) -> None:
        prepared.append(response.status)
        response.headers["X-Hook"] = "ran"  # serve's drain sets `Connection: close` the same way

    app.on_response_prepare.append(hook)
    url = await serve_app(app)
    async with aiohttp.ClientSession() as session, session.get(f"{url}{PATH}?pageSize=2") as resp:
        assert resp.status == 200
        assert resp.headers["X-Hook"] == "ran"
        assert len((await resp.json())["data"]) == 2
    assert prepared == [200]
    assert simulator.api_requests == 1


@pytest.mark.parametrize(
    "request_line",
    [b"CONNECT example.com:443 HTTP/1.1", b"OPTIONS * HTTP/1.1"],
    ids=["connect-authority-form", "options-asterisk"],
)
async def test_targets_no_route_can_match_get_the_proxys_invalid_request_problem(serve_app, simulator, request_line):
    url = await serve_app(data_app(simulator))
    status, headers, body = await raw_exchange(url, request_line + b"\r\nHost: example.com\r\n\r\n")
    assert status == 400, body
    assert headers["x-st-proxy-error"] == "invalid_request"
    assert headers["content-type"].startswith("application/problem+json")
    assert simulator.api_requests == 0


async def test_an_upload_expecting_100_continue_gets_it_and_arrives_whole(serve_app, simulator):
    url = await serve_app(data_app(simulator))
    body = b"x" * 300_000
    async with (
        asyncio.timeout(30),  # without a 100 the client would wait for ever: a bound, not a speed check
        aiohttp.ClientSession() as session,
        session.post(f"{url}/crm/v2/tenant/{T1.tenant_id}/echo", data=body, expect100=True) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["body_length"] == len(body)


async def test_an_unknown_expectation_is_refused_with_417_and_nothing_is_sent_upstream(serve_app, simulator):
    url = await serve_app(data_app(simulator))
    request = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    status, _, _ = await raw_exchange(url, request.encode())
    assert status == 417
    assert simulator.token_requests == 0 and simulator.api_requests == 0  # refused before any step ran


async def test_the_data_runner_opens_the_client_sessions_at_setup_and_closes_them_at_cleanup(simulator):
    app = data_app(simulator)
    runtime = app[RUNTIME]
    runner = DataRunner(app, access_log=None)
    assert runtime.api_session is None
    await runner.setup()
    try:
        sessions = (runtime.api_session, runtime.token_session)
        assert all(s is not None and not s.closed for s in sessions)
        assert runtime.tokens is not None
    finally:
        await runner.cleanup()
    assert all(s is not None and s.closed for s in sessions)
