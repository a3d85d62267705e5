"""Shared fixtures: a real simulator on loopback, configs pointing at it, and the proxy on real sockets."""

from __future__ import annotations

import base64
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

from st_proxy.config import Config, from_mapping
from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS, Simulator
from st_proxy.ops import log as logsetup
from st_proxy.server.app import create_admin_app, create_app
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
    started: list[Simulator] = []

    async def make(**kwargs: Any) -> Simulator:
        sim = Simulator(**kwargs)
        await sim.start("127.0.0.1", 0)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


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
        return str(self.server.make_url("")).rstrip("/")

    @property
    def admin_url(self) -> str:
        return str(self.admin.make_url("")).rstrip("/")

    async def metrics_text(self) -> str:
        # The session keeps bodies as sent (auto_decompress=False), so ask for them uncompressed.
        async with self.session.get(self.admin_url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
            return await resp.text()


@pytest.fixture
async def start_proxy(aiohttp_server) -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    sessions: list[aiohttp.ClientSession] = []

    async def start(config: Config, **kwargs: Any) -> RunningProxy:
        registry = kwargs.pop("registry", None) or CollectorRegistry()
        kwargs.setdefault("rng", random.Random(7))
        kwargs.setdefault("environ", {})  # no HTTP(S)_PROXY from the machine: tests talk to loopback directly
        app = create_app(config, registry=registry, **kwargs)
        server = await aiohttp_server(app)
        admin = await aiohttp_server(create_admin_app(app[RUNTIME]))
        session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        sessions.append(session)
        return RunningProxy(server, admin, app, app[RUNTIME], registry, session)

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
def captured_logs() -> Callable[[], str]:
    """Everything the proxy logged during the test, as the JSON lines it would print."""
    stream = io.StringIO()
    logsetup.setup("json", "debug", stream)
    yield stream.getvalue
    logging.getLogger("st_proxy").handlers.clear()
