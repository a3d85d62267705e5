"""End to end through the proxy: what reaches the upstream, byte for byte, and what comes back (docs/forwarding.md).

The upstream here is either the simulator or ``Recorder``, a plain aiohttp server that keeps exactly what arrived
(raw request target, raw header list, body bytes) and answers as the test tells it to.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from conftest import T1, T2, TokenGate, raw_exchange, sim_config
from yarl import URL

from st_proxy.config import from_mapping
from st_proxy.devtools.simulator import DEMO_APP_KEY, FAKE_REDIRECT

TENANT_PATH = f"/crm/v2/tenant/{T1.tenant_id}"


@dataclass
class Arrived:
    method: str
    target: str  # the request target exactly as it came off the wire
    headers: list[tuple[str, str]]  # in order, duplicates kept
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


@dataclass
class Recorder:
    """A stand-in ServiceTitan that records every request and answers with ``reply`` (default: 200, a small JSON)."""

    url: str = ""
    seen: list[Arrived] = field(default_factory=list)
    reply: Callable[[web.Request, Arrived], Awaitable[web.StreamResponse]] | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        arrived = Arrived(request.method, request.raw_path, raw, await request.read())
        self.seen.append(arrived)
        if self.reply is not None:
            return await self.reply(request, arrived)
        return web.json_response({"ok": True})

    @property
    def last(self) -> Arrived:
        assert self.seen, "nothing reached the upstream"
        return self.seen[-1]


@pytest.fixture
async def recorder(fake_upstream) -> Recorder:
    rec = Recorder()
    # Bytes exactly as they came off the wire: no size cap, no inflating of gzip bodies.
    rec.url = await fake_upstream(rec.handle, client_max_size=64 * 2**20, handler_args={"auto_decompress": False})
    return rec


@pytest.fixture
async def via_recorder(simulator, recorder, start_proxy):
    """The proxy with tokens from the simulator and the API played by ``recorder``."""
    return await start_proxy(sim_config(simulator, api_url=recorder.url))


def token_of(sim, tenant_id: str) -> str:
    """The last token the simulator issued for ``tenant_id`` (the JWT's ``tenant`` claim)."""
    for token in reversed(sim.issued_tokens):
        claims = token.split(".")[1]
        if json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["tenant"] == tenant_id:
            return token
    raise AssertionError(f"no token issued for tenant {tenant_id}")


def exact(base: str, target: str) -> URL:
    """A URL the client sends exactly as written (yarl would otherwise normalise %2F and the query)."""
    return URL(base + target, encoded=True)


# ---- headers --------------------------------------------------------------------------------------------------


async def test_the_callers_credentials_are_replaced_by_the_tenants_token_and_app_key(simulator, recorder, via_recorder):
    async with via_recorder.session.get(
        f"{via_recorder.url}{TENANT_PATH}/customers",
        headers={"Authorization": "Bearer caller-made-this-up", "ST-App-Key": "ak1.caller"},
    ) as resp:
        assert resp.status == 200
    arrived = recorder.last
    assert arrived.header("Authorization") == [f"Bearer {token_of(simulator, T1.tenant_id)}"]
    assert arrived.header("ST-App-Key") == [DEMO_APP_KEY]


async def test_hop_by_hop_tenant_host_and_proxy_headers_never_reach_the_upstream(recorder, via_recorder):
    request = (
        f"GET {TENANT_PATH}/customers HTTP/1.1\r\n"
        "Host: proxy.local:8080\r\n"
        f"X-Tenant-ID: {T1.tenant_id}\r\n"
        "Connection: close, X-Listed-In-Connection\r\n"
        "X-Listed-In-Connection: gone\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Proxy-Authorization: Basic cHJveHk6cHJveHk=\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Anything: x\r\n"
        "X-Kept: one\r\n"
        "X-Kept: two\r\n"
        "\r\n"
    ).encode()
    status, _, _ = await raw_exchange(via_recorder.url, request)
    assert status == 200
    arrived = recorder.last
    names = arrived.names()
    for gone in (
        "x-tenant-id",
        "x-listed-in-connection",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "proxy-anything",
    ):
        assert gone not in names, gone
    assert arrived.header("Host") == [URL(recorder.url).raw_authority]
    assert arrived.header("X-Kept") == ["one", "two"]
    assert arrived.header("Connection") != ["close, X-Listed-In-Connection"]


async def test_a_callers_request_id_travels_upstream_and_comes_back(recorder, via_recorder):
    async with via_recorder.session.get(
        f"{via_recorder.url}{TENANT_PATH}/customers", headers={"X-Request-ID": "caller-trace-123"}
    ) as resp:
        assert resp.headers["X-Request-ID"] == "caller-trace-123"
    assert recorder.last.header("X-Request-ID") == ["caller-trace-123"]


async def test_a_request_without_an_id_gets_one_generated_upstream_and_returned(recorder, via_recorder):
    async with via_recorder.session.get(f"{via_recorder.url}{TENANT_PATH}/customers") as resp:
        returned = resp.headers["X-Request-ID"]
    assert len(returned) >= 16
    assert recorder.last.header("X-Request-ID") == [returned]


async def test_an_empty_authorization_prefix_sends_the_bare_token(simulator, recorder, start_proxy):
    proxy = await start_proxy(sim_config(simulator, api_url=recorder.url, tokens={"authorization_prefix": ""}))
    async with proxy.session.get(f"{proxy.url}{TENANT_PATH}/customers") as resp:
        assert resp.status == 200
    assert recorder.last.header("Authorization") == [token_of(simulator, T1.tenant_id)]


async def test_a_tenants_own_app_key_overrides_the_shared_one(simulator, recorder, start_proxy):
    raw = {
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"sim": {"auth_url": simulator.auth_url, "api_url": recorder.url}},
        "tenants": {
            T1.tenant_id: {
                "environment": "sim",
                "client_id": T1.client_id,
                "client_secret": {"value": T1.client_secret},
                "app_key": {"value": "ak1.migrated-scopes"},
            },
            T2.tenant_id: {
                "environment": "sim",
                "client_id": T2.client_id,
                "client_secret": {"value": T2.client_secret},
            },
        },
    }
    config = from_mapping(raw, {})
    proxy = await start_proxy(config)
    for tenant in (T1, T2):
        async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{tenant.tenant_id}/customers") as resp:
            assert resp.status == 200
    assert recorder.seen[0].header("ST-App-Key") == ["ak1.migrated-scopes"]
    assert recorder.seen[1].header("ST-App-Key") == [DEMO_APP_KEY]


async def test_no_header_the_caller_did_not_send_is_added_except_the_proxys_own(recorder, via_recorder):
    request = f"POST {TENANT_PATH}/notes HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    status, _, _ = await raw_exchange(via_recorder.url, request.encode())
    assert status == 200
    names = recorder.last.names()
    for invented in ("accept-encoding", "user-agent", "accept", "content-type"):
        assert invented not in names, invented
    assert names - {"connection"} == {"host", "content-length", "authorization", "st-app-key", "x-request-id"}


# ---- exact passthrough -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
async def test_every_standard_method_is_forwarded_as_is(method, recorder, via_recorder):
    async with via_recorder.session.request(method, f"{via_recorder.url}{TENANT_PATH}/jobs/42") as resp:
        assert resp.status == 200
    assert recorder.last.method == method
    assert recorder.last.target == f"{TENANT_PATH}/jobs/42"


async def test_path_and_query_reach_the_upstream_byte_for_byte(recorder, via_recorder):
    target = f"{TENANT_PATH}/files/a%2Fb/%7Euser/x;v=1?a=1&a=2&b=%20+x&empty=&flag&q=%2F%3F%26"
    async with via_recorder.session.get(exact(via_recorder.url, target)) as resp:
        assert resp.status == 200
    assert recorder.last.target == target


async def test_a_path_prefix_in_api_url_is_kept_and_the_callers_path_appended(simulator, recorder, start_proxy):
    proxy = await start_proxy(sim_config(simulator, api_url=recorder.url + "/prefix/v9"))
    target = f"{TENANT_PATH}/files/a%2Fb?x=%20+y"
    async with proxy.session.get(exact(proxy.url, target)) as resp:
        assert resp.status == 200
    assert recorder.last.target == "/prefix/v9" + target


async def test_a_get_with_a_json_body_keeps_its_body_and_content_length(recorder, via_recorder):
    async with via_recorder.session.get(
        f"{via_recorder.url}{TENANT_PATH}/customers", data=b"{}", headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
    arrived = recorder.last
    assert (arrived.method, arrived.body) == ("GET", b"{}")
    assert arrived.header("Content-Length") == ["2"]
    assert arrived.header("Content-Type") == ["application/json"]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_a_body_on_any_method_arrives_unchanged(method, recorder, via_recorder):
    body = json.dumps({"method": method, "note": "ünïcödé"}).encode()
    async with via_recorder.session.request(method, f"{via_recorder.url}{TENANT_PATH}/jobs/42", data=body) as resp:
        assert resp.status == 200
    assert recorder.last.body == body
    assert recorder.last.header("Content-Length") == [str(len(body))]


async def test_a_body_larger_than_the_replay_limit_keeps_its_content_length_and_is_not_chunked(recorder, via_recorder):
    body = bytes(range(256)) * 8192  # 2 MiB: above the 1 MiB replay limit, so it is streamed, not kept
    async with via_recorder.session.put(
        f"{via_recorder.url}{TENANT_PATH}/attachments/1", data=io.BytesIO(body)
    ) as resp:
        assert resp.status == 200
    arrived = recorder.last
    assert arrived.header("Content-Length") == [str(len(body))]
    assert arrived.header("Transfer-Encoding") == []
    assert arrived.body == body


async def test_a_request_without_a_body_goes_upstream_without_one(recorder, via_recorder):
    request = f"GET {TENANT_PATH}/customers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert (await raw_exchange(via_recorder.url, request))[0] == 200
    assert recorder.last.header("Content-Length") == []
    assert recorder.last.header("Transfer-Encoding") == []


async def test_an_empty_body_with_content_length_0_keeps_it(recorder, via_recorder):
    request = f"POST {TENANT_PATH}/jobs/42/cancel HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert (await raw_exchange(via_recorder.url, request.encode()))[0] == 200
    assert recorder.last.header("Content-Length") == ["0"]
    assert recorder.last.body == b""


async def test_an_upload_sent_with_expect_100_continue_arrives_whole(recorder, via_recorder):
    body = bytes(range(256)) * 8192  # curl sends Expect: 100-continue for bodies over 1 MiB
    async with via_recorder.session.put(
        f"{via_recorder.url}{TENANT_PATH}/attachments/1", data=io.BytesIO(body), expect100=True
    ) as resp:
        assert resp.status == 200
    assert recorder.last.body == body


async def test_a_chunked_request_body_is_forwarded_whole(recorder, via_recorder):
    async def parts():
        for i in range(5):
            yield f"part {i};".encode()

    async with via_recorder.session.post(f"{via_recorder.url}{TENANT_PATH}/notes", data=parts()) as resp:
        assert resp.status == 200
    assert recorder.last.body == b"part 0;part 1;part 2;part 3;part 4;"


async def test_gzip_bodies_pass_through_both_ways_untouched(recorder, via_recorder):
    upload = gzip.compress(b'{"name": "compressed upload"}' * 100)
    download = gzip.compress(b'{"name": "compressed answer"}' * 100)

    async def gzipped(request: web.Request, arrived: Arrived) -> web.Response:
        return web.Response(body=download, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    recorder.reply = gzipped
    async with via_recorder.session.post(
        f"{via_recorder.url}{TENANT_PATH}/notes",
        data=upload,
        headers={"Content-Encoding": "gzip"},
        skip_auto_headers=("Accept-Encoding",),
    ) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == download  # the test session does not decompress either
    assert recorder.last.body == upload
    assert recorder.last.header("Content-Encoding") == ["gzip"]
    assert recorder.last.header("Accept-Encoding") == []


async def test_a_callers_own_accept_encoding_is_forwarded(recorder, via_recorder):
    async with via_recorder.session.get(
        f"{via_recorder.url}{TENANT_PATH}/customers", headers={"Accept-Encoding": "br"}
    ) as resp:
        assert resp.status == 200
    assert recorder.last.header("Accept-Encoding") == ["br"]


async def test_a_redirect_is_returned_to_the_caller_not_followed(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator))
    before = simulator.api_requests
    async with proxy.session.get(f"{proxy.url}{TENANT_PATH}/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == FAKE_REDIRECT
    assert simulator.api_requests == before + 1


async def test_upstream_cookies_reach_the_caller_but_are_never_sent_back_upstream(recorder, via_recorder):
    async def set_cookie(request: web.Request, arrived: Arrived) -> web.Response:
        return web.json_response({"ok": True}, headers={"Set-Cookie": "session=first-callers; Path=/"})

    recorder.reply = set_cookie
    async with via_recorder.session.get(f"{via_recorder.url}{TENANT_PATH}/login") as resp:
        assert resp.headers.getall("Set-Cookie") == ["session=first-callers; Path=/"]
    recorder.reply = None
    async with aiohttp.ClientSession() as another_caller:
        async with another_caller.get(f"{via_recorder.url}{TENANT_PATH}/customers") as resp:
            assert resp.status == 200
    assert recorder.last.header("Cookie") == []


async def test_upstream_status_headers_and_error_bodies_pass_through_unchanged(recorder, via_recorder):
    problem = {"type": "x", "title": "Not Found", "status": 404, "traceId": "abc"}

    async def not_found(request: web.Request, arrived: Arrived) -> web.Response:
        return web.json_response(problem, status=404, headers={"X-Upstream": "yes"})

    recorder.reply = not_found
    async with via_recorder.session.get(f"{via_recorder.url}{TENANT_PATH}/jobs/999") as resp:
        assert resp.status == 404
        assert resp.headers["X-Upstream"] == "yes"
        assert "X-ST-Proxy-Error" not in resp.headers
        assert await resp.json() == problem


async def test_head_answers_carry_the_upstream_content_length_and_no_body(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator))
    async with proxy.session.head(f"{proxy.url}{TENANT_PATH}/download?bytes=12345") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "12345"
        assert await resp.read() == b""


# ---- what the proxy refuses --------------------------------------------------------------------------------------


async def test_a_nonstandard_method_token_gets_a_4xx_and_nothing_reaches_the_upstream(recorder, via_recorder):
    request = f"DEL {TENANT_PATH}/jobs/42 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, _, _ = await raw_exchange(via_recorder.url, request)
    assert 400 <= status < 500
    assert recorder.seen == []


async def test_an_absolute_form_target_is_refused_and_no_other_host_is_contacted(recorder, via_recorder):
    # The "other host" is the recorder itself, named in absolute form: it must see nothing.
    request = (
        f"GET {recorder.url}{TENANT_PATH}/customers HTTP/1.1\r\nHost: {URL(recorder.url).raw_authority}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status, headers, body = await raw_exchange(via_recorder.url, request)
    assert status == 400
    assert headers["x-st-proxy-error"] == "invalid_request"
    assert headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["status"] == 400
    assert recorder.seen == []


async def test_connect_is_refused_and_no_tunnel_is_opened(recorder, via_recorder):
    authority = URL(recorder.url).raw_authority
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()
    status, headers, _ = await raw_exchange(via_recorder.url, request)
    assert status == 400
    assert headers["x-st-proxy-error"] == "invalid_request"
    assert recorder.seen == []


async def test_an_asterisk_form_options_is_refused_as_invalid_request(recorder, via_recorder):
    status, headers, _ = await raw_exchange(via_recorder.url, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400
    assert headers["x-st-proxy-error"] == "invalid_request"
    assert headers["connection"] == "close"  # raw_exchange reads until close: no Connection: close was sent
    assert recorder.seen == []


# ---- routing errors -------------------------------------------------------------------------------------------


async def problem_of(resp: aiohttp.ClientResponse) -> dict:
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type="application/problem+json")
    assert body["status"] == resp.status
    assert body["request_id"] == resp.headers["X-Request-ID"]
    assert set(body) >= {"type", "title", "status", "detail", "tenant", "request_id"}
    return body


@pytest.mark.parametrize(
    ("target", "headers", "code"),
    [
        pytest.param("/crm/v2/customers", {}, "tenant_required", id="a_request_naming_no_tenant_gets_tenant_required"),
        pytest.param(
            f"{TENANT_PATH}/customers",
            {"X-Tenant-ID": T2.tenant_id},
            "tenant_mismatch",
            id="header_and_path_naming_different_tenants_get_tenant_mismatch",
        ),
    ],
)
async def test_a_request_routed_to_no_single_tenant_gets_a_400_problem_naming_none(
    recorder, via_recorder, target, headers, code
):
    async with via_recorder.session.get(f"{via_recorder.url}{target}", headers=headers) as resp:
        assert resp.status == 400
        assert resp.headers["X-ST-Proxy-Error"] == code
        body = await problem_of(resp)
    assert body["tenant"] is None
    assert recorder.seen == []


async def test_a_tenant_without_credentials_here_gets_unknown_tenant(recorder, via_recorder):
    async with via_recorder.session.get(
        f"{via_recorder.url}/crm/v2/tenant/999/customers", headers={"X-Request-ID": "trace-unknown"}
    ) as resp:
        assert resp.status == 403
        assert resp.headers["X-ST-Proxy-Error"] == "unknown_tenant"
        body = await problem_of(resp)
    assert (body["tenant"], body["request_id"]) == ("999", "trace-unknown")
    assert recorder.seen == []


async def test_a_tenant_header_that_is_not_digits_gets_invalid_request(recorder, via_recorder):
    async with via_recorder.session.get(
        f"{via_recorder.url}/crm/v2/customers", headers={"X-Tenant-ID": "../1000001"}
    ) as resp:
        assert resp.status == 400
        assert resp.headers["X-ST-Proxy-Error"] == "invalid_request"
        await problem_of(resp)
    assert recorder.seen == []


async def test_the_tenant_header_alone_routes_a_request_whose_path_names_none(simulator, recorder, via_recorder):
    async with via_recorder.session.get(
        f"{via_recorder.url}/settings/v2/anything", headers={"X-Tenant-ID": T2.tenant_id}
    ) as resp:
        assert resp.status == 200
    assert recorder.last.header("Authorization") == [f"Bearer {token_of(simulator, T2.tenant_id)}"]


# ---- concurrency: cold misses share one token request per tenant --------------------------------------------------


async def burst(proxy, gate: TokenGate, tenants: list[str]) -> list[int]:
    """One request per entry in ``tenants``, all at once; tokens are answered only once every request is waiting."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as callers:

        async def one(tenant_id: str) -> int:
            async with callers.get(f"{proxy.url}/crm/v2/tenant/{tenant_id}/customers?pageSize=1") as resp:
                await resp.read()
                return resp.status

        requests = [asyncio.ensure_future(one(t)) for t in tenants]
        try:
            async with asyncio.timeout(20):
                # Polling for arrival, bounded by the timeout; nothing here is timed.
                while proxy.registry.get_sample_value("st_proxy_in_flight_requests") < len(tenants):
                    await asyncio.sleep(0.01)
            gate.open()
            async with asyncio.timeout(20):
                return list(await asyncio.gather(*requests))
        finally:
            for request in requests:
                request.cancel()
            await asyncio.gather(*requests, return_exceptions=True)


async def test_200_concurrent_cold_requests_for_one_tenant_make_one_token_request(gated_simulator, start_proxy):
    gate = TokenGate()
    gate.close()
    sim = await gated_simulator(gate)
    proxy = await start_proxy(sim_config(sim), prewarm=False)
    assert await burst(proxy, gate, [T1.tenant_id] * 200) == [200] * 200
    assert sim.token_requests == 1


async def test_two_tenants_with_100_concurrent_cold_requests_each_make_two_token_requests(gated_simulator, start_proxy):
    gate = TokenGate()
    gate.close()
    sim = await gated_simulator(gate)
    proxy = await start_proxy(sim_config(sim), prewarm=False)
    assert await burst(proxy, gate, [T1.tenant_id, T2.tenant_id] * 100) == [200] * 200
    assert dict(sim.token_requests_by_client) == {T1.client_id: 1, T2.client_id: 1}
