"""Property-based tests (hypothesis) of hostile input against a proxy with clients (docs/security.md).

Methods, request targets (percent-escapes, dot and empty segments, absolute-form, ``*``), tenant header values,
Authorization values and bodies, sent as raw bytes over a real socket to the real proxy, in front of a recording
upstream that always answers 200 and the simulator's token endpoint. For every example:

- the proxy itself never answers 5xx (the upstream never does, so any 5xx would be the proxy's own);
- no caller's Authorization value, client secret or local token ever reaches the upstream;
- the upstream only ever sees a tenant the caller's client may use, with that tenant's real token.

Size and seed: ``max_examples=200`` per test, ``derandomize=True`` (the examples are a fixed function of the test, so
a failure reproduces on every run and in CI), no example database, ``deadline=None`` (a loaded CI machine must not
turn slowness into a failure).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import client_setup
import pytest
from aiohttp import web
from client_setup import BILLING, BILLING_SECRET, OPS, OPS_SECRET, clients_config
from conftest import T1, T2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from st_proxy.devtools.simulator import Simulator
from st_proxy.server.app import create_app

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CONFIGURED = (T1.tenant_id, T2.tenant_id)
ALLOWED = {BILLING: {T1.tenant_id}, OPS: set(CONFIGURED)}


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]


class Harness:
    """The simulator, a recording upstream and the proxy, on one event loop in a thread (hypothesis drives sync
    tests; the servers must keep running between examples)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.seen: list[Seen] = []
        self.runners: list[web.AppRunner] = []
        self.sim: Simulator | None = None
        self.proxy_port = 0
        self.bearer = ""

    def __repr__(self) -> str:
        return f"Harness(proxy on 127.0.0.1:{self.proxy_port}, {len(self.seen)} upstream requests so far)"

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return runner.addresses[0][1]

    async def start(self) -> None:
        self.sim = Simulator()
        await self.sim.start("127.0.0.1", 0)

        async def record(request: web.Request) -> web.Response:
            await request.read()
            self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items())))
            return web.Response(text="upstream ok")

        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", record)
        api_port = await self._serve(upstream)
        config = clients_config(self.sim, api_url=f"http://127.0.0.1:{api_port}")
        self.proxy_port = await self._serve(create_app(config, registry=CollectorRegistry(), environ={}))

    async def stop(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()
        if self.sim is not None:
            await self.sim.stop()

    def tenant_of(self, token: str) -> str | None:
        assert self.sim is not None
        issued = self.sim._issued.get(token)
        return issued.tenant_id if issued else None


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    thread = threading.Thread(target=h.loop.run_forever, daemon=True)
    thread.start()
    h.run(h.start())
    status, body = send(
        h,
        b"POST",
        b"/connect/token",
        [],
        f"grant_type=client_credentials&client_id={BILLING}&client_secret={BILLING_SECRET}".encode(),
        content_type=b"application/x-www-form-urlencoded",
    )
    assert status == 200
    h.bearer = body.split(b'"access_token": "')[1].split(b'"')[0].decode()
    yield h
    h.run(h.stop())
    h.loop.call_soon_threadsafe(h.loop.stop)
    thread.join(10)
    h.loop.close()


def send(
    h: Harness, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes, *, content_type=b""
) -> tuple[int, bytes]:
    """One request as raw bytes on a fresh connection; (status, whole answer). 0: the proxy closed without answering."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: proxy", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if content_type:
        lines.append(b"Content-Type: " + content_type)
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", h.proxy_port), timeout=30) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1."):
        return 0, answer
    return int(answer.split(b" ", 2)[1]), answer


def basic(name: str, secret: str, *, form: bool = False) -> bytes:
    return client_setup.basic(name, secret, form_encoded=form)["Authorization"].encode()


# ---- strategies ---------------------------------------------------------------------------------------------------
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
TENANT_IDS = st.sampled_from([T1.tenant_id, T2.tenant_id, "99999", "0", "1" * 25, "-1", "12a"])
SEGMENT = st.one_of(
    st.sampled_from(
        [
            "crm",
            "v2",
            "tenant",
            "customers",
            "echo",
            ".",
            "..",
            "",
            "%2e",
            "%2E%2e",
            "%2F",
            "%00",
            "%31",
            "%ZZ",
            "%",
            "a%20b",
            "*",
            "tenant%2F1000001",
            "v2;x",
            "?",
            "#",
        ]
    ),
    TENANT_IDS,
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"), max_size=8),
)
NORMAL_SEGMENT = st.sampled_from(["customers", "jobs", "echo", "42", "export", "a%20b", "%31", "x;y", "~u"])
PATHS = st.one_of(
    # Mostly well-formed ServiceTitan paths, so that many examples get through to the upstream ...
    st.builds(
        lambda t, rest: f"/crm/v2/tenant/{t}/" + "/".join(rest),
        st.sampled_from(CONFIGURED),
        st.lists(NORMAL_SEGMENT, min_size=1, max_size=3),
    ),
    st.builds(lambda rest: "/crm/v2/" + "/".join(rest), st.lists(NORMAL_SEGMENT, min_size=1, max_size=2)),
    # ... and the rest hostile.
    st.builds(lambda t, rest: f"/crm/v2/tenant/{t}/" + "/".join(rest), TENANT_IDS, st.lists(SEGMENT, max_size=3)),
    st.builds(lambda segs: "/" + "/".join(segs), st.lists(SEGMENT, max_size=6)),
    st.sampled_from(
        [
            "*",
            "http://evil.example/crm/v2/tenant/1000001/x",
            "evil.example:443",
            "/connect/token",
            "//crm/v2/tenant/1000001/x",
            "/crm/v2/tenant/1000001/./x",
        ]
    ),
)
QUERY = st.one_of(st.just(""), st.builds(lambda q: "?" + q, PRINTABLE.map(lambda s: s.replace(" ", "%20"))))
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    st.sampled_from(["HEAD", "OPTIONS", "TRACE", "CONNECT", "DEL", "X"]),
)
CREDENTIALS = st.one_of(
    st.sampled_from(["billing", "billing-form", "ops", "bearer", "bare"]), st.sampled_from(["none", "wrong", "garbage"])
)


def authorization(h: Harness, kind: str, garbage: str) -> tuple[bytes | None, str | None]:
    """(the header value, the client it authenticates as, if any)."""
    return {
        "none": (None, None),
        "billing": (basic(BILLING, BILLING_SECRET), BILLING),
        "billing-form": (basic(BILLING, BILLING_SECRET, form=True), BILLING),
        "ops": (basic(OPS, OPS_SECRET), OPS),
        "bearer": (b"Bearer " + h.bearer.encode(), BILLING),
        "bare": (h.bearer.encode(), BILLING),
        "wrong": (basic(OPS, OPS_SECRET[::-1]), None),
        "garbage": (garbage.encode(), None),
    }[kind]


def check_upstream(h: Harness, sent_authorization: bytes | None, client: str | None, before: int) -> None:
    """What reached the upstream during this example: allowed tenants, their real tokens, nothing of the caller's."""
    secrets = [BILLING_SECRET, OPS_SECRET, h.bearer]
    for seen in h.seen[before:]:
        assert client is not None, f"an unauthenticated request reached the upstream: {seen}"
        values = [v for name, v in seen.headers if name.lower() == "authorization"]
        assert len(values) == 1 and values[0].startswith("Bearer ")
        tenant = h.tenant_of(values[0][7:])
        assert tenant in ALLOWED[client], (tenant, client, seen)
        for _, value in seen.headers:
            assert sent_authorization is None or value != sent_authorization.decode("latin-1")
            assert not any(secret in value for secret in secrets)
        assert not any(secret in seen.raw_path for secret in secrets)


# ---- the properties -----------------------------------------------------------------------------------------------
@SETTINGS
@given(
    method=METHODS,
    path=PATHS,
    query=QUERY,
    credentials=CREDENTIALS,
    garbage=PRINTABLE,
    tenant_header=st.one_of(st.none(), st.none(), TENANT_IDS, PRINTABLE),
    body=st.binary(max_size=2048),
)
def test_hostile_requests_never_get_a_5xx_from_the_proxy_and_only_allowed_tenants_reach_upstream(
    harness, method, path, query, credentials, garbage, tenant_header, body
):
    auth, client = authorization(harness, credentials, garbage)
    headers = [(b"Authorization", auth)] if auth is not None else []
    if tenant_header is not None:
        headers.append((b"X-Tenant-ID", tenant_header.encode()))
    before = len(harness.seen)
    status, answer = send(harness, method.encode(), (path + query).encode(), headers, body)
    assert status == 0 or status < 500, answer[:500]
    check_upstream(harness, auth, client, before)
    for secret in (BILLING_SECRET, OPS_SECRET, harness.bearer):
        assert secret.encode() not in answer


@SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    path_tenant=TENANT_IDS,
    rest=st.lists(NORMAL_SEGMENT, min_size=1, max_size=3),
    credentials=CREDENTIALS,
    garbage=PRINTABLE,
    tenant_header=st.one_of(st.none(), TENANT_IDS),
    body=st.binary(max_size=512),
)
def test_well_formed_requests_reach_the_upstream_exactly_when_the_client_may_use_the_tenant(
    harness, method, path_tenant, rest, credentials, garbage, tenant_header, body
):
    auth, client = authorization(harness, credentials, garbage)
    headers = [(b"Authorization", auth)] if auth is not None else []
    if tenant_header is not None:
        headers.append((b"X-Tenant-ID", tenant_header.encode()))
    path = f"/crm/v2/tenant/{path_tenant}/" + "/".join(rest)
    before = len(harness.seen)
    status, answer = send(harness, method.encode(), path.encode(), headers, body)
    check_upstream(harness, auth, client, before)
    named = {path_tenant} if path_tenant.isdigit() else set()  # the path names any run of digits
    if tenant_header is not None:
        named.add(tenant_header)
    allowed = client is not None and len(named) == 1 and named <= ALLOWED[client]
    # The oracle: through to the upstream (once, answered 200) exactly when the client may use the one tenant named.
    assert (status == 200) == allowed, (status, answer[:300])
    assert len(harness.seen) - before == (1 if allowed else 0)


@SETTINGS
@given(
    credentials=CREDENTIALS,
    garbage=PRINTABLE,
    form=st.dictionaries(
        st.sampled_from(["grant_type", "client_id", "client_secret", "scope", "x"]),
        st.one_of(st.sampled_from(["client_credentials", BILLING, BILLING_SECRET, OPS, "password"]), PRINTABLE),
        max_size=4,
    ),
    raw=st.one_of(st.none(), st.binary(max_size=300)),
    content_type=st.sampled_from([b"application/x-www-form-urlencoded", b"application/json", b"", b"text/plain"]),
)
def test_the_token_endpoint_never_answers_5xx_and_never_goes_upstream(
    harness, credentials, garbage, form, raw, content_type
):
    from urllib.parse import urlencode

    auth, _ = authorization(harness, credentials, garbage)
    headers = [(b"Authorization", auth)] if auth is not None else []
    body = raw if raw is not None else urlencode(form).encode()
    before, tokens_before = len(harness.seen), harness.sim.token_requests
    status, answer = send(harness, b"POST", b"/connect/token", headers, body, content_type=content_type)
    assert status in (200, 400, 401, 429), answer[:500]
    assert len(harness.seen) == before and harness.sim.token_requests == tokens_before
    for secret in (BILLING_SECRET, OPS_SECRET):
        assert secret.encode() not in answer
