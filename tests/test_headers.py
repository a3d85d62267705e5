"""What travels and what does not (docs/forwarding.md): the header functions, then the same
rules end to end through the proxy, with a byte-level upstream on loopback that records exactly what arrived."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from conftest import T1, parse_answer, parse_head, send_raw, sim_config
from multidict import CIMultiDict, CIMultiDictProxy

from st_proxy.devtools.simulator import DEMO_APP_KEY
from st_proxy.http.headers import (
    downstream_response_headers,
    request_id,
    upstream_request_headers,
)

HOP_BY_HOP = ["Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade"]


def cim(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def outgoing(*pairs: tuple[str, str], tenant_header: str | None = "X-Tenant-ID") -> list[tuple[str, str]]:
    out = upstream_request_headers(
        cim(*pairs), tenant_header=tenant_header, authorization="Bearer T0KEN", app_key="ak1.key", request_id="rid-1"
    )
    return list(out.items())


# ---- request headers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HOP_BY_HOP)
def test_each_hop_by_hop_request_header_is_stripped(name):
    sent = outgoing((name, "x"), ("Accept", "application/json"))
    assert [n for n, _ in sent if n.lower() == name.lower()] == []
    assert ("Accept", "application/json") in sent


def test_every_header_named_in_connection_is_stripped_case_insensitively():
    sent = outgoing(
        ("Connection", "keep-alive, X-Hop-One"),
        ("connection", " x-hop-two ,"),
        ("X-HOP-ONE", "1"),
        ("x-hop-two", "2"),
        ("X-Kept", "3"),
    )
    assert [n for n, _ in sent if n.lower().startswith("x-hop")] == []
    assert ("X-Kept", "3") in sent


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "ST-App-Key",
        "st-app-key",
        "X-Tenant-ID",
        "x-tenant-id",
        "Host",
        "Proxy-Authorization",
        "Proxy-Anything",
        "X-Request-ID",
    ],
)
def test_credentials_routing_host_and_proxy_headers_from_the_caller_do_not_travel(name):
    sent = outgoing((name, "from-the-caller"))
    assert "from-the-caller" not in [v for _, v in sent]


def test_the_proxy_adds_its_credentials_and_the_request_id_exactly_once():
    sent = outgoing(("Authorization", "Bearer caller"), ("ST-App-Key", "caller"), ("Accept", "*/*"))
    assert [(n, v) for n, v in sent if n.lower() in ("authorization", "st-app-key", "x-request-id")] == [
        ("Authorization", "Bearer T0KEN"),
        ("ST-App-Key", "ak1.key"),
        ("X-Request-ID", "rid-1"),
    ]


def test_repeated_ordinary_headers_are_kept_in_order():
    sent = outgoing(("X-Dup", "a"), ("Accept", "*/*"), ("x-dup", "b"), ("X-Dup", "c"))
    assert [(n, v) for n, v in sent if n.lower() in ("x-dup", "accept")] == [
        ("X-Dup", "a"),
        ("Accept", "*/*"),
        ("x-dup", "b"),
        ("X-Dup", "c"),
    ]


def test_end_to_end_content_headers_are_kept():
    pairs = [
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("Content-Encoding", "gzip"),
        ("Accept-Encoding", "gzip"),
        ("If-None-Match", '"e1"'),
        ("Cookie", "a=1"),
    ]
    sent = outgoing(*pairs)
    assert [p for p in sent if p in pairs] == pairs


def test_with_header_routing_off_the_tenant_header_travels():
    assert ("X-Tenant-ID", "42") in outgoing(("X-Tenant-ID", "42"), tenant_header=None)


def test_a_custom_tenant_header_is_the_one_stripped():
    sent = outgoing(("X-Customer", "42"), ("X-Tenant-ID", "42"), tenant_header="X-Customer")
    assert ("X-Tenant-ID", "42") in sent and "X-Customer" not in [n for n, _ in sent]


# ---- request id -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["abc-123", "0f8fad5b-d9cb-469f-a165-70867728950e", "a" * 200, "trace:1/2=3"])
def test_a_sane_caller_request_id_is_kept(given):
    assert request_id(cim(("X-Request-ID", given))) == given


@pytest.mark.parametrize("given", [None, "", "has space", "a" * 201, "caf\u00e9", "tab\there"])
def test_a_missing_or_odd_request_id_is_replaced_by_a_generated_one(given):
    incoming = cim(("X-Request-ID", given)) if given is not None else cim()
    made = request_id(incoming)
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert made != request_id(incoming)  # a fresh one each time


# ---- response headers -------------------------------------------------------------------------------------------
def test_response_hop_by_hop_and_connection_listed_headers_are_stripped_and_the_rest_kept_in_order():
    upstream = cim(
        ("Connection", "close, X-Up-Hop"),
        ("X-Up-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
        ("Content-Length", "10"),
    )
    out = list(downstream_response_headers(upstream, "rid-9").items())
    assert out == [
        ("Set-Cookie", "a=1"),
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
        ("X-Request-ID", "rid-9"),
    ]  # Content-Length: the handler's job


def test_an_upstream_request_id_is_passed_through_rather_than_replaced():
    out = downstream_response_headers(cim(("X-Request-ID", "upstream-id")), "rid-9")
    assert out.getall("X-Request-ID") == ["upstream-id"]


# ---- end to end -------------------------------------------------------------------------------------------------
UPSTREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 2\r\n"
    b"Connection: close, X-Up-Hop\r\n"
    b"X-Up-Hop: leaks-if-you-see-me\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"X-Dup: 1\r\n"
    b"Set-Cookie: a=1\r\n"
    b"X-Dup: 2\r\n"
    b"Set-Cookie: b=2\r\n"
    b"\r\n"
    b"ok"
)


class RecordingUpstream:
    """A loopback HTTP/1.1 server that keeps every request's bytes and answers each with UPSTREAM_ANSWER."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head.lower())
            body = await reader.readexactly(int(length.group(1))) if length else b""
            self.requests.append((head, body))
            writer.write(UPSTREAM_ANSWER)
            await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    server = RecordingUpstream()
    await server.start()
    yield server
    await server.stop()


async def test_headers_through_the_proxy_are_stripped_added_and_kept_as_the_design_says(
    simulator, upstream, start_proxy
):
    proxy = await start_proxy(sim_config(simulator, api_url=upstream.url), prewarm=False)
    path = f"/crm/v2/tenant/{T1.tenant_id}/notes?a=1&b=%2F"
    request = (
        f"POST {path} HTTP/1.1\r\n"
        "Host: evil.example\r\n"
        "Connection: close, X-Hop\r\n"
        "X-Hop: must-not-travel\r\n"
        "Keep-Alive: timeout=99\r\n"
        "TE: trailers\r\n"
        "Proxy-Authorization: Basic cHJveHk6cGFzcw==\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Authorization: Bearer callers-own-token\r\n"
        "st-app-key: callers-own-key\r\n"
        f"X-Tenant-ID: {T1.tenant_id}\r\n"
        "X-Dup: a\r\n"
        "X-Other: z\r\n"
        "X-Dup: b\r\n"
        "X-Request-ID: caller-req-1\r\n"
        "Content-Type: text/plain\r\n"
        "Content-Length: 5\r\n"
        "\r\n"
        "hello"
    ).encode()
    status, answer_headers, body = parse_answer(await send_raw(proxy.url, request))

    ((head, sent_body),) = upstream.requests
    request_line, sent = parse_head(head)
    names = [name.lower() for name, _ in sent]
    assert request_line == f"POST {path} HTTP/1.1".encode()
    assert sent_body == b"hello"
    for gone in (
        "x-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "x-tenant-id",
        "transfer-encoding",
    ):
        assert gone not in names
    assert [v for n, v in sent if n.lower() == "host"] == [upstream.url.removeprefix("http://")]
    assert [v for n, v in sent if n.lower() == "authorization"] == [f"Bearer {simulator.issued_tokens[0]}"]
    assert [v for n, v in sent if n.lower() == "st-app-key"] == [DEMO_APP_KEY]
    assert [v for n, v in sent if n.lower() == "x-request-id"] == ["caller-req-1"]
    assert [(n, v) for n, v in sent if n.lower() in ("x-dup", "x-other")] == [
        ("X-Dup", "a"),
        ("X-Other", "z"),
        ("X-Dup", "b"),
    ]
    assert [v for n, v in sent if n.lower() == "content-length"] == ["5"]
    assert "accept-encoding" not in names  # none added that the caller did not send
    assert b"callers-own" not in head

    assert status == b"HTTP/1.1 200 OK"
    answer_names = [name.lower() for name, _ in answer_headers]
    assert "x-up-hop" not in answer_names and "keep-alive" not in answer_names
    assert all("x-up-hop" not in v.lower() for n, v in answer_headers if n.lower() == "connection")
    assert [(n, v) for n, v in answer_headers if n.lower() in ("x-dup", "set-cookie")] == [
        ("X-Dup", "1"),
        ("Set-Cookie", "a=1"),
        ("X-Dup", "2"),
        ("Set-Cookie", "b=2"),
    ]
    assert [v for n, v in answer_headers if n.lower() == "content-length"] == ["2"]
    assert [v for n, v in answer_headers if n.lower() == "x-request-id"] == ["caller-req-1"]
    assert body == b"ok"
