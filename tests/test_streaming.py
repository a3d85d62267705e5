"""Bodies stream through the proxy both ways, never read whole (docs/forwarding.md).

Streaming is proven by order of events, not by time: the caller holds back its last upload chunk until the upstream
has seen the first bytes, and the upstream holds back the rest of a download until the caller has seen the first
bytes. A proxy that buffered a whole body would wait forever, and the bounded wait turns that into a failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from conftest import T1, sim_config
from prometheus_client import CollectorRegistry
from yarl import URL

from st_proxy.server.app import create_app
from st_proxy.server.data_port import DataRunner

MiB = 2**20
CHUNKS = 50  # 50 MiB each way
WAIT = 30  # seconds before a held-back side gives up: a buffering proxy fails instead of hanging
TENANT_PATH = f"/crm/v2/tenant/{T1.tenant_id}"


def chunks() -> tuple[list[bytes], str]:
    """CHUNKS distinct 1 MiB blocks and the sha256 of their concatenation."""
    base = random.Random(2).randbytes(MiB)
    blocks = [i.to_bytes(4, "big") + base[4:] for i in range(CHUNKS)]
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block)
    return blocks, digest.hexdigest()


@dataclass
class Upstream:
    url: str = ""
    first_bytes_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    caller_has_first_bytes: asyncio.Event = field(default_factory=asyncio.Event)
    upload: dict = field(default_factory=dict)
    download: list[bytes] = field(default_factory=list)
    with_length: bool = True

    async def receive(self, request: web.Request) -> web.Response:
        digest, length = hashlib.sha256(), 0
        try:
            async for chunk in request.content.iter_any():
                self.first_bytes_arrived.set()
                digest.update(chunk)
                length += len(chunk)
        except (ConnectionError, web.RequestPayloadError):  # the upload was cut off on the way
            self.upload = {"broken_after": length}
            raise
        self.upload = {
            "sha256": digest.hexdigest(),
            "length": length,
            "content_length": request.headers.get("Content-Length"),
            "transfer_encoding": request.headers.get("Transfer-Encoding"),
        }
        return web.json_response({"received": length})

    async def send(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if self.with_length:
            response.content_length = sum(map(len, self.download))
        await response.prepare(request)
        await response.write(self.download[0])
        async with asyncio.timeout(WAIT):
            await self.caller_has_first_bytes.wait()
        try:
            for block in self.download[1:]:
                await response.write(block)
            await response.write_eof()
        except ConnectionError:  # the proxy hung up: its caller did
            pass
        return response


@pytest.fixture
async def upstream(fake_upstream) -> Upstream:
    up = Upstream()
    app = web.Application()
    app.router.add_put(f"{TENANT_PATH}/attachments/1", up.receive)
    app.router.add_get(f"{TENANT_PATH}/attachments/1", up.send)
    up.url = await fake_upstream(app)
    return up


@pytest.fixture
async def proxy(simulator, upstream, start_proxy):
    return await start_proxy(sim_config(simulator, api_url=upstream.url))


async def test_a_50_mb_upload_reaches_the_upstream_before_the_caller_has_sent_it_all(upstream, proxy):
    blocks, expected = chunks()

    async def body() -> AsyncIterator[bytes]:
        for block in blocks[:-1]:
            yield block
        async with asyncio.timeout(WAIT):
            await upstream.first_bytes_arrived.wait()  # the upstream is reading while the caller still holds data
        yield blocks[-1]

    async with proxy.session.put(
        f"{proxy.url}{TENANT_PATH}/attachments/1", data=body(), headers={"Content-Length": str(CHUNKS * MiB)}
    ) as resp:
        assert resp.status == 200
    assert upstream.upload == {
        "sha256": expected,
        "length": CHUNKS * MiB,
        "content_length": str(CHUNKS * MiB),
        "transfer_encoding": None,
    }


async def test_a_chunked_upload_streams_upstream_as_chunked(upstream, proxy):
    blocks, _ = chunks()
    small = blocks[:3]
    expected = hashlib.sha256(b"".join(small)).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        yield small[0]
        async with asyncio.timeout(WAIT):
            await upstream.first_bytes_arrived.wait()
        for block in small[1:]:
            yield block

    async with proxy.session.put(f"{proxy.url}{TENANT_PATH}/attachments/1", data=body()) as resp:
        assert resp.status == 200
    assert upstream.upload == {
        "sha256": expected,
        "length": 3 * MiB,
        "content_length": None,
        "transfer_encoding": "chunked",
    }


async def read_download(proxy, upstream) -> tuple[aiohttp.ClientResponse, str, int]:
    digest, length = hashlib.sha256(), 0
    async with proxy.session.get(f"{proxy.url}{TENANT_PATH}/attachments/1") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            upstream.caller_has_first_bytes.set()  # the upstream is still holding back the rest
            digest.update(chunk)
            length += len(chunk)
    return resp, digest.hexdigest(), length


async def test_a_50_mb_download_reaches_the_caller_before_the_upstream_has_sent_it_all(upstream, proxy):
    upstream.download, expected = chunks()
    resp, digest, length = await read_download(proxy, upstream)
    assert (digest, length) == (expected, CHUNKS * MiB)
    assert resp.headers["Content-Length"] == str(CHUNKS * MiB)


async def test_a_download_without_content_length_streams_to_the_caller_chunked(upstream, proxy):
    blocks, _ = chunks()
    upstream.download, upstream.with_length = blocks[:3], False
    resp, digest, length = await read_download(proxy, upstream)
    assert (digest, length) == (hashlib.sha256(b"".join(blocks[:3])).hexdigest(), 3 * MiB)
    assert "Content-Length" not in resp.headers
    assert resp.headers["Transfer-Encoding"] == "chunked"


# ---- a caller that hangs up mid-transfer is the caller's doing, not ServiceTitan's --------------------------------


async def wait_for_sample(proxy, name: str, labels: dict[str, str], value: float) -> None:
    async with asyncio.timeout(WAIT):
        while proxy.registry.get_sample_value(name, labels) != value:
            await asyncio.sleep(0.01)  # polling for the proxy to finish the request; bounded, not timed


@pytest.fixture(params=["aiohttp test server", "production runner"])
async def hangup_proxy(request, simulator, upstream, start_proxy) -> AsyncIterator[object]:
    """The proxy on aiohttp's test server (which cancels a handler when its caller hangs up) and on the runner
    `st-proxy serve` uses (which lets the handler run on and find out by itself): both must report the hang-up."""
    config = sim_config(simulator, api_url=upstream.url)
    if request.param == "aiohttp test server":
        yield await start_proxy(config)
    else:
        registry = CollectorRegistry()
        runner = DataRunner(create_app(config, registry=registry), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                yield SimpleNamespace(url=f"http://{host}:{port}", registry=registry, session=session)
        finally:
            await runner.cleanup()


def upstream_errors(proxy) -> float:
    return sum(
        proxy.registry.get_sample_value("st_proxy_upstream_errors_total", {"tenant": T1.tenant_id, "kind": k})
        for k in ("connect", "timeout", "reset")
    )


async def test_a_caller_hanging_up_mid_upload_is_logged_as_such_and_not_blamed_on_the_upstream(
    upstream, hangup_proxy, captured_logs
):
    proxy = hangup_proxy
    reader, writer = await asyncio.open_connection(URL(proxy.url).host, URL(proxy.url).port)
    writer.write(f"PUT {TENANT_PATH}/attachments/1 HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MiB}\r\n\r\n".encode())
    writer.write(bytes(2 * MiB))
    await writer.drain()
    async with asyncio.timeout(WAIT):
        await upstream.first_bytes_arrived.wait()
    writer.close()
    await writer.wait_closed()

    await wait_for_sample(proxy, "st_proxy_requests_total", {"tenant": T1.tenant_id, "method": "PUT", "code": "499"}, 1)
    assert upstream_errors(proxy) == 0
    assert '"error": "caller_disconnected"' in captured_logs()
    upstream.download = [b"still serving"]
    upstream.caller_has_first_bytes.set()
    async with proxy.session.get(f"{proxy.url}{TENANT_PATH}/attachments/1") as resp:
        assert await resp.read() == b"still serving"


async def test_a_caller_hanging_up_mid_download_is_logged_as_such_and_not_blamed_on_the_upstream(
    upstream, hangup_proxy, captured_logs
):
    proxy = hangup_proxy
    upstream.download, _ = chunks()
    async with proxy.session.get(f"{proxy.url}{TENANT_PATH}/attachments/1") as resp:
        assert len(await resp.content.readany()) > 0
        upstream.caller_has_first_bytes.set()
        resp.close()  # hang up with 49 MiB still to come

    await wait_for_sample(proxy, "st_proxy_requests_total", {"tenant": T1.tenant_id, "method": "GET", "code": "200"}, 1)
    assert upstream_errors(proxy) == 0
    assert '"error": "caller_disconnected"' in captured_logs()
