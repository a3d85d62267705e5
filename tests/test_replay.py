"""Upstream 401 replay (docs/tokens.md, issue 3 point 6), through the proxy against the real simulator, plus one
small fake API that refuses every token (the simulator never refuses a fresh one)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest
from aiohttp import web
from conftest import T1, T2, raw_server, sim_config
from test_tokens import echo, get, metrics

ECHO = f"/crm/v2/tenant/{T1.tenant_id}/echo"


async def replays(proxy, tenant: str = T1.tenant_id) -> tuple[float, int]:
    """(st_proxy_token_replays_total, /tenants replays) for the tenant."""
    m = await metrics(proxy)
    async with proxy.session.get(proxy.admin_url + "/tenants") as resp:
        listed = {t["id"]: t for t in (await resp.json())["tenants"]}
    return m[("st_proxy_token_replays_total", (("tenant", tenant),))], listed[tenant]["replays"]


async def post(proxy, body: bytes, path: str = ECHO, **kwargs):
    async with proxy.session.post(proxy.url + path, data=body, **kwargs) as resp:
        return resp.status, await resp.read()


async def test_a_token_revoked_upstream_is_replaced_and_the_caller_still_gets_200(simulator, start_proxy, clock):
    proxy = await start_proxy(sim_config(simulator), clock=clock, prewarm=False)
    revoked = await echo(proxy)
    simulator.revoke_tokens(T1.tenant_id)
    fresh = await echo(proxy)  # 401 upstream, a new token through the single flight, the replay answers 200
    assert fresh != revoked
    assert simulator.token_requests == 2 and simulator.api_requests == 3
    assert await replays(proxy) == (1, 1)
    assert await replays(proxy, T2.tenant_id) == (0, 0)


async def test_a_small_body_is_replayed_byte_for_byte(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    await echo(proxy)
    simulator.revoke_tokens()
    body = json.dumps({"name": "x" * 500}).encode()
    status, answer = await post(proxy, body, headers={"Content-Type": "application/json"})
    assert status == 200
    assert json.loads(answer)["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert await replays(proxy) == (1, 1)


async def test_concurrent_401s_for_the_same_revoked_token_share_one_new_token(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    await echo(proxy)
    simulator.revoke_tokens()
    sent = await asyncio.gather(*(echo(proxy) for _ in range(30)))
    assert len(set(sent)) == 1
    assert simulator.token_requests == 2


async def test_an_app_key_401_is_not_replayed_and_reaches_the_caller_unchanged(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator, app_key={"value": "ak1.wrong"}), prewarm=False)
    for _ in range(3):
        status, headers, body = await get(proxy)
        assert status == 401 and "X-ST-Proxy-Error" not in headers
        problem = json.loads(body)
        assert problem["title"].startswith("Application key") and problem["traceId"]
    assert simulator.token_requests == 1  # the token was fine: not dropped
    assert simulator.api_requests == 3
    assert await replays(proxy) == (0, 0)


@pytest.fixture
async def refusing_api(fake_upstream):
    """An API that answers every call with ServiceTitan's token 401, counting the calls."""
    calls: list[str] = []

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        calls.append(request.headers["Authorization"])
        return web.json_response(
            {
                "type": "https://tools.ietf.org/html/rfc7235#section-3.1",
                "title": "Unauthorized",
                "status": 401,
                "traceId": "trace-1",
            },
            status=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    return await fake_upstream(refuse), calls


async def test_a_second_401_goes_back_to_the_caller_and_does_not_hammer_the_token_endpoint(
    simulator, refusing_api, start_proxy, clock
):
    api_url, calls = refusing_api
    proxy = await start_proxy(sim_config(simulator, api_url=api_url), clock=clock, prewarm=False)
    status, headers, body = await get(proxy)
    assert status == 401 and json.loads(body)["traceId"] == "trace-1"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert len(calls) == 2 and calls[0] != calls[1]  # sent once, replayed once with a new token
    assert simulator.token_requests == 2
    for _ in range(20):  # within 30 s another drop would be a token request per call: the 401 goes back as it is
        assert (await get(proxy))[0] == 401
    assert simulator.token_requests == 2 and len(calls) == 22
    assert await replays(proxy) == (1, 1)
    clock.advance(30)
    assert (await get(proxy))[0] == 401
    assert simulator.token_requests == 3 and len(calls) == 24
    assert await replays(proxy) == (2, 2)


async def test_a_large_streamed_upload_that_gets_a_401_is_not_replayed(simulator, start_proxy):
    config = sim_config(simulator, tokens={"replay_body_limit_bytes": 1024})
    proxy = await start_proxy(config, prewarm=False)
    await echo(proxy)
    simulator.revoke_tokens()
    status, body = await post(proxy, b"x" * 64 * 1024)
    assert status == 401 and json.loads(body)["title"] == "Unauthorized"
    assert simulator.api_requests == 2
    assert await replays(proxy) == (0, 0)
    # The refused token was still dropped: the next request gets a fresh one without needing a replay.
    status, body = await post(proxy, b"y" * 512)
    assert status == 200 and json.loads(body)["body_length"] == 512
    assert simulator.token_requests == 2
    assert await replays(proxy) == (0, 0)


async def test_a_chunked_upload_of_unknown_length_is_not_replayed(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    await echo(proxy)
    simulator.revoke_tokens()

    async def chunks():
        yield b"small"

    status, _ = await post(proxy, chunks())
    assert status == 401
    assert await replays(proxy) == (0, 0)


async def test_a_replay_whose_new_token_is_refused_by_the_token_endpoint_answers_token_rejected(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    await echo(proxy)
    simulator.revoke_tokens()
    simulator.set_secret(T1.tenant_id, "cs1.regenerated-by-the-admin")
    status, headers, body = await get(proxy)
    assert status == 502 and headers["X-ST-Proxy-Error"] == "token_rejected"
    assert "invalid_client" in json.loads(body)["detail"]
    assert await replays(proxy) == (0, 0)


@pytest.fixture
async def broken_401_api():
    """A raw loopback API that answers ServiceTitan's token 401 with a body larger than the proxy buffers, and hangs
    up half-way through it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 200000\r\n\r\n"
            + b'{"title": "Unauthorized", "pad": "'
            + b"x" * 100_000
        )
        await writer.drain()
        writer.close()

    async with raw_server(answer) as url:
        yield url


async def test_a_large_401_that_breaks_off_is_cut_off_for_the_caller_not_turned_into_a_500(
    simulator, broken_401_api, start_proxy
):
    # The body is not kept for a replay (limit 0), so the 401 goes back to the caller; the upstream hangs up mid-body.
    config = sim_config(simulator, api_url=broken_401_api, tokens={"replay_body_limit_bytes": 0})
    proxy = await start_proxy(config, prewarm=False)
    async with proxy.session.post(proxy.url + ECHO, data=b"0123456789") as resp:
        assert resp.status == 401  # the upstream's status line, as for any answer that breaks off mid-stream
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    m = await metrics(proxy)
    assert m[("st_proxy_upstream_errors_total", (("kind", "reset"), ("tenant", T1.tenant_id)))] == 1
    assert not [key for key in m if key[0] == "st_proxy_requests_total" and ("code", "500") in key[1]]
