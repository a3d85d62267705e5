"""Graceful shutdown of a real `st-proxy serve` process (docs/operations.md, "Shutdown and draining").

The upstream here is a gate: it sends the status line and a first chunk, then holds the rest of the stream until the
test opens the gate, so "a request in flight when SIGTERM arrives" is a fact, not a race.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from conftest import T1
from serve_process import ServeProcess, poll_until, write_config

from st_proxy.devtools.simulator import DEMO_APP_KEY


class Gate:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first\n")
        self.started.set()
        await self.release.wait()
        await response.write(b"last\n")
        await response.write_eof()
        return response


@pytest.fixture
async def gate(fake_upstream) -> AsyncIterator[tuple[Gate, str]]:
    gate = Gate()
    yield gate, await fake_upstream(gate.handle)
    gate.release.set()  # nothing may stay parked on the gate when the server closes


@pytest.fixture
async def serve(tmp_path, simulator, gate) -> AsyncIterator:
    children: list[ServeProcess] = []

    async def start(**shutdown: float) -> ServeProcess:
        config = write_config(
            tmp_path,
            auth_url=simulator.auth_url,
            api_url=gate[1],
            tenants=[T1],
            app_key=DEMO_APP_KEY,
            shutdown=shutdown,
        )
        child = await ServeProcess.start(config)
        children.append(child)
        await poll_until(lambda: _status(child.admin_url + "/readyz", 200), what="readiness")
        return child

    yield start
    for child in children:
        await child.close()


async def _get_status(url: str) -> int | None:
    """A fresh connection each time; None when it is refused."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status
    except aiohttp.ClientConnectorError:
        return None


async def _status(url: str, want: int | None) -> bool:
    return await _get_status(url) == want


async def _refused(url: str) -> bool:
    return await _get_status(url) is None


def _path() -> str:
    return f"/crm/v2/tenant/{T1.tenant_id}/export/jobs"


async def test_sigterm_lets_an_in_flight_stream_finish_refuses_new_connections_after_the_drain_and_exits_0(serve, gate):
    child = await serve(drain_seconds=0.5, timeout_seconds=30)
    async with aiohttp.ClientSession() as caller, caller.get(child.url + _path()) as resp:
        assert resp.status == 200
        assert await resp.content.readline() == b"first\n"

        child.send(signal.SIGTERM)
        await poll_until(lambda: _status(child.admin_url + "/readyz", 503), what="/readyz turning 503")
        await poll_until(lambda: _refused(f"{child.url}/crm/v2/tenant/999/customers"), what="the listener closing")
        assert child.proc.returncode is None  # still waiting for the request in flight

        gate[0].release.set()
        assert await resp.content.read() == b"last\n"
    assert await child.wait_exit() == 0
    events = [e["event"] for e in child.events if e.get("event") in ("draining", "listener_closed", "stopped")]
    assert events == ["draining", "listener_closed", "stopped"]
    assert child.with_event("listener_closed")[0]["open_connections"] >= 1


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
async def test_while_draining_new_connections_are_served_and_a_second_signal_exits_at_once_with_1(serve, second):
    child = await serve(drain_seconds=600, timeout_seconds=600)
    child.send(signal.SIGTERM)
    await child.wait_event("draining")
    assert await _get_status(child.admin_url + "/readyz") == 503
    assert await _get_status(child.admin_url + "/healthz") == 200
    async with aiohttp.ClientSession() as caller, caller.get(f"{child.url}/crm/v2/tenant/999/customers") as resp:
        assert resp.status == 403  # a new connection during the drain is accepted and answered
        assert resp.headers["Connection"] == "close"  # and told to reconnect elsewhere next time

    child.send(second)
    assert await child.wait_exit() == 1  # long before the 600 s drain would have ended
    assert child.with_event("exit_now")
    assert not child.with_event("stopped")


async def test_a_request_still_running_at_the_shutdown_timeout_is_cut_and_the_process_still_exits_0(serve, gate):
    child = await serve(drain_seconds=0, timeout_seconds=0.5)
    async with aiohttp.ClientSession() as caller, caller.get(child.url + _path()) as resp:
        assert await resp.content.readline() == b"first\n"
        child.send(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()  # the gate never opens: the proxy cancels the request and cuts it
    assert await child.wait_exit() == 0
    assert child.with_event("stopped")


async def test_sigint_skips_the_drain_delay_but_still_exits_0(serve):
    child = await serve(drain_seconds=600, timeout_seconds=600)
    child.send(signal.SIGINT)
    assert await child.wait_exit() == 0  # the deadline is far below the 600 s drain: SIGINT did not wait for it
    assert child.with_event("draining")[0]["drain_seconds"] == 0


async def test_a_sighup_while_in_flight_requests_finish_does_not_kill_the_process(serve, gate):
    child = await serve(drain_seconds=0, timeout_seconds=30)
    async with aiohttp.ClientSession() as caller, caller.get(child.url + _path()) as resp:
        assert await resp.content.readline() == b"first\n"
        child.send(signal.SIGTERM)
        await child.wait_event("listener_closed")
        child.send(signal.SIGHUP)  # a config-management tool reloading at the wrong moment
        gate[0].release.set()
        assert await resp.content.read() == b"last\n"
    assert await child.wait_exit() == 0
    assert child.with_event("stopped")
