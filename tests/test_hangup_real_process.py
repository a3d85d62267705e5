"""A caller hanging up cancels its upstream exchange in the real `st-proxy serve` process, not only in aiohttp's test
server: the upstream sees its connection closed at once (not after read_timeout), and the access line says 499."""

from __future__ import annotations

import asyncio

from held_upstream import DEADLINE, PATH, access_line, held, serve_held  # noqa: F401 (fixtures)
from yarl import URL


async def test_a_caller_hanging_up_closes_the_upstream_exchange_in_the_real_process(held, serve_held):
    upstream, _ = held
    child = await serve_held(upstream={"read_timeout_seconds": 3600})  # the exchange could otherwise run for an hour
    target = URL(child.url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: proxy.test\r\n\r\n".encode())
    await writer.drain()
    await asyncio.wait_for(upstream.arrived.wait(), DEADLINE)
    writer.close()  # the caller hangs up while the proxy waits on the upstream
    await writer.wait_closed()

    await asyncio.wait_for(upstream.let_go.wait(), DEADLINE)  # the proxy closed the upstream connection
    line = await access_line(child)
    assert (line["status"], line["error"]) == (499, "caller_disconnected")
