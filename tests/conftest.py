"""Shared fixtures: a real simulator on loopback, configs pointing at it, and the proxy on real sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from yarl import URL

from st_proxy.config import Config, from_mapping
from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS, Simulator
from st_proxy.ops import log as logsetup
from st_proxy.server.app import create_admin_app, create_app
from st_proxy.server.data_port import DataRunner
from st_proxy.server.runtime import RUNTIME, Runtime

T1, T2 = DEMO_TENANTS[0], DEMO_TENANTS[1]


def basic_auth(name: str, secret: str) -> dict[str, str]:
    """``Authorization: Basic base64(name:secret)`` (RFC 7617), raw; aiohttp's BasicAuth helper is deprecated."""
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{secret}".encode()).decode()}


class FakeClock:
    """An injected clock: tests move time, nothing sleeps."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_simulator() -> AsyncIterator[Callable[..., Awaitable[Simulator]]]:
    """``await make_simulator(**Simulator kwargs)``: a started simulator on loopback, stopped after the test.

    ``middlewares`` go in front of its handlers (a gate on the token endpoint, say) before it starts.
    """
    started: list[Simulator] = []

    async def make(*, middlewares: tuple = (), **kwargs: Any) -> Simulator:
        sim = Simulator(**kwargs)
        sim.app.middlewares.extend(middlewares)
        await sim.start("127.0.0.1", 0)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session (it inflates compressed answers, unlike ``RunningProxy.session``)."""
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def simulator(make_simulator) -> Simulator:
    return await make_simulator()


def sim_config(
    sim: Simulator | None = None,
    *,
    api_url: str | None = None,
    auth_url: str | None = None,
    tenants=DEMO_TENANTS,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """A config for the demo tenants against ``sim`` (or explicit URLs); ``overrides`` are top-level sections."""
    raw: dict[str, Any] = {
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {
            "sim": {
                "auth_url": auth_url or (sim.auth_url if sim else "http://127.0.0.1:9/connect/token"),
                "api_url": api_url or (sim.base_url if sim else "http://127.0.0.1:9"),
            }
        },
        "tenants": {
            t.tenant_id: {"environment": "sim", "client_id": t.client_id, "client_secret": {"value": t.client_secret}}
            for t in tenants
        },
    }
    raw.update(overrides)
    return from_mapping(raw, environ or {})


@dataclass
class RunningProxy:
    server: TestServer
    admin: TestServer
    app: web.Application
    runtime: Runtime
    registry: CollectorRegistry
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return base_url(self.server)

    @property
    def admin_url(self) -> str:
        return base_url(self.admin)

    async def metrics_text(self) -> str:
        # The session keeps bodies as sent (auto_decompress=False), so ask for them uncompressed.
        async with self.session.get(self.admin_url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
            return await resp.text()


class DataTestServer(TestServer):
    """aiohttp's test server for the data app, serving it as `st-proxy serve` does: through the low-level web.Server
    (server/data_port.DataRunner), not the app's router. Like every aiohttp test server it cancels a handler whose
    caller hangs up (handler_cancellation=True)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return DataRunner(self.app, **kwargs)


@pytest.fixture
async def start_proxy(aiohttp_server) -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    sessions: list[aiohttp.ClientSession] = []
    servers: list[TestServer] = []

    async def start(config: Config, **kwargs: Any) -> RunningProxy:
        registry = kwargs.pop("registry", None) or CollectorRegistry()
        kwargs.setdefault("rng", random.Random(7))
        kwargs.setdefault("environ", {})  # no HTTP(S)_PROXY from the machine: tests talk to loopback directly
        app = create_app(config, registry=registry, **kwargs)
        server = DataTestServer(app)
        servers.append(server)
        await server.start_server()
        admin = await aiohttp_server(create_admin_app(app[RUNTIME]))
        session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        sessions.append(session)
        return RunningProxy(server, admin, app, app[RUNTIME], registry, session)

    yield start
    for session in sessions:
        await session.close()
    while servers:
        await servers.pop().close()


@pytest.fixture
def captured_logs() -> Callable[[], str]:
    """Everything the proxy logged during the test, as the JSON lines it would print."""
    stream = io.StringIO()
    logsetup.setup("json", "debug", stream)

    def read() -> str:
        logsetup.flush()  # access lines are written in batches (ops/log.py)
        return stream.getvalue()

    yield read
    logging.getLogger("st_proxy").handlers.clear()


# ---- fake upstreams and raw sockets -----------------------------------------------------------------------------


def base_url(server: TestServer) -> str:
    """``http://127.0.0.1:PORT`` of a test server, without the trailing slash (paths are appended to it)."""
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
def fake_upstream(aiohttp_server) -> Callable[..., Awaitable[str]]:
    """``await fake_upstream(handler)``: an aiohttp server on loopback answering every method and path with
    ``handler`` (``app_kwargs`` go to its ``web.Application``), or ``await fake_upstream(app)`` for an app with routes
    of its own. Returns the base URL; the server stops after the test."""

    async def start(handler_or_app: web.Application | Callable[..., Any], **app_kwargs: Any) -> str:
        if isinstance(handler_or_app, web.Application):
            app = handler_or_app
        else:
            app = web.Application(**app_kwargs)
            app.router.add_route("*", "/{tail:.*}", handler_or_app)
        return base_url(await aiohttp_server(app))

    return start


RAW_DEADLINE = 10.0  # seconds: a bound on one loopback exchange, never a timing assertion


@contextlib.asynccontextmanager
async def raw_server(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A loopback server whose every connection ``answer`` handles with raw bytes (for answers aiohttp's server would
    never give: no Server header, a body cut short, not HTTP at all); yields its base URL."""
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def send_raw(url: str, request: bytes) -> bytes:
    """Write ``request`` exactly as given on a fresh connection and read the answer until the server closes (the
    request asks it to with `Connection: close`, or the server closes after refusing it)."""
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), RAW_DEADLINE)
    finally:
        writer.close()
        await writer.wait_closed()


def parse_head(head: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """A message head as (start line, header pairs in order with duplicates kept and names as sent)."""
    first, *lines = head.rstrip(b"\r\n").split(b"\r\n")
    pairs = [line.decode("latin-1").partition(":") for line in lines]
    return first, [(name, value.strip()) for name, _, value in pairs]


def parse_answer(answer: bytes) -> tuple[bytes, list[tuple[str, str]], bytes]:
    """Raw answer bytes as (status line, header pairs as in ``parse_head``, body)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    first, pairs = parse_head(head)
    return first, pairs, body


async def raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``send_raw`` and parse: (status, headers by lower-cased name (the last of duplicates), body)."""
    first, pairs, body = parse_answer(await send_raw(url, request))
    return int(first.split(b" ")[1]), {name.strip().lower(): value for name, value in pairs}, body


# ---- a gate on the simulator's token endpoint ---------------------------------------------------------------------


class TokenGate:
    """A gate in front of the simulator's token endpoint: while closed, token requests (of ``clients``, or all) wait
    at the gate; counts how many arrived and how many were being handled at once."""

    def __init__(self, clients: set[str] | None = None) -> None:
        self.opened = asyncio.Event()
        self.opened.set()
        self.clients = clients
        self.arrived = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._arrivals: asyncio.Condition = asyncio.Condition()

    def close(self) -> None:
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    async def wait_for_arrivals(self, n: int) -> None:
        async with self._arrivals:
            await asyncio.wait_for(self._arrivals.wait_for(lambda: self.arrived >= n), 10)

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.path != "/connect/token":
            return await handler(request)
        if self.clients is not None:
            form = await request.post()  # cached by aiohttp: the token handler reads the same form again
            if form.get("client_id") not in self.clients:
                return await handler(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            async with self._arrivals:
                self.arrived += 1
                self._arrivals.notify_all()
            await self.opened.wait()
            return await handler(request)
        finally:
            self.in_flight -= 1


@pytest.fixture
async def gated_simulator(make_simulator) -> AsyncIterator[Callable[..., Awaitable[Simulator]]]:
    """``make(gate, **simulator_kwargs)``: a simulator on loopback whose token endpoint sits behind ``gate``."""
    gates: list[TokenGate] = []

    async def make(gate: TokenGate, **kwargs: Any) -> Simulator:
        gates.append(gate)
        return await make_simulator(middlewares=(gate.middleware,), **kwargs)

    yield make
    for gate in gates:  # before make_simulator stops the simulators: nothing may stay parked at a gate
        gate.open()
