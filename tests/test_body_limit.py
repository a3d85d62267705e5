"""security.max_body_bytes (docs/security.md): a declared length over the limit is refused with nothing sent
upstream; a chunked body that passes it aborts the upstream connection before its final chunk, so no truncated body
is ever taken for a complete one."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from conftest import T1, sim_config

LIMIT = 1000


def echo_url(proxy) -> str:
    return f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/echo"


async def chunks(*sizes: int):
    for size in sizes:
        yield b"x" * size


@pytest.fixture
async def proxy(simulator, start_proxy):
    return await start_proxy(sim_config(simulator, security={"max_body_bytes": LIMIT}), prewarm=False)


async def test_a_declared_length_over_the_limit_gets_413_and_nothing_goes_upstream(proxy, simulator):
    async with proxy.session.post(echo_url(proxy), data=b"x" * (LIMIT + 1)) as resp:
        assert resp.status == 413
        assert resp.headers["X-ST-Proxy-Error"] == "body_too_large"
        assert (await resp.json(content_type=None))["tenant"] == T1.tenant_id
    assert simulator.token_requests == 0 and simulator.api_requests == 0


async def test_bodies_up_to_the_limit_pass_declared_or_chunked(proxy):
    async with proxy.session.post(echo_url(proxy), data=b"y" * LIMIT) as resp:
        assert resp.status == 200 and (await resp.json())["body_length"] == LIMIT
    async with proxy.session.post(echo_url(proxy), data=chunks(400, 400, 200)) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["body_length"] == LIMIT and echoed["body_sha256"] == hashlib.sha256(b"x" * LIMIT).hexdigest()


class RawUpstream:
    """An API server that never answers: it records every byte it receives until the proxy closes the connection."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = asyncio.Event()
        self.got_data = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += data
            if b"x" in data:
                self.got_data.set()
        self.closed.set()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_a_chunked_body_past_the_limit_aborts_the_upstream_before_its_final_chunk(simulator, start_proxy):
    upstream = RawUpstream()
    api_url = await upstream.start()
    try:
        config = sim_config(simulator, api_url=api_url, security={"max_body_bytes": LIMIT})
        proxy = await start_proxy(config, prewarm=False)

        async def body():
            yield b"x" * 600
            await asyncio.wait_for(upstream.got_data.wait(), 10)  # the first part was streamed through
            yield b"x" * 600
            yield b"x" * 600

        async with proxy.session.post(echo_url(proxy), data=body()) as resp:
            assert resp.status == 413
            assert resp.headers["X-ST-Proxy-Error"] == "body_too_large"
        await asyncio.wait_for(upstream.closed.wait(), 10)
    finally:
        await upstream.stop()
    head, _, body = bytes(upstream.received).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert 600 <= body.count(b"x") <= LIMIT  # the part within the limit went out, streamed ...
    assert not body.endswith(b"0\r\n\r\n")  # ... but never the last chunk: the request is incomplete upstream


async def test_without_a_limit_large_chunked_bodies_stream_as_before(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    async with proxy.session.post(echo_url(proxy), data=chunks(*[64 * 1024] * 8)) as resp:
        assert resp.status == 200 and (await resp.json())["body_length"] == 8 * 64 * 1024
