"""The forward-proxy mode with real CONNECT from real HTTP client libraries, real TLS on loopback, and the local CA
made by `st-proxy certs init`. ServiceTitan's names resolve nowhere here: the proxy never resolves an intercepted
host, it serves the tunnel itself and forwards to the simulator that the production environment points at."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import certifi
import pytest
import requests
from aiohttp import web
from conftest import T1
from prometheus_client import CollectorRegistry
from tls_helpers import bare_tls_server, client_context, issue, make_ca

from st_proxy.config import Config, from_mapping
from st_proxy.devtools.simulator import DEMO_APP_KEY, Simulator
from st_proxy.server.app import create_app
from st_proxy.server.serve import start_site
from st_proxy.tls.certs import LocalCA
from st_proxy.tls.forward import ForwardProxy, start_forward_proxy
from st_proxy.tls.leaves import LeafCache, tunnel_host

ST_HOSTS = [
    "auth.servicetitan.io",
    "api.servicetitan.io",
    "auth-integration.servicetitan.io",
    "api-integration.servicetitan.io",
]


def production_at(
    sim: Simulator, ca: Path, environments: dict | None = None, top: dict | None = None, **overrides
) -> Config:
    """A tenant in the *production* environment, whose URLs point at the simulator, and the forward proxy."""
    raw = {
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"production": {"auth_url": sim.auth_url, "api_url": sim.base_url}, **(environments or {})},
        "tenants": {T1.tenant_id: {"client_id": T1.client_id, "client_secret": {"value": T1.client_secret}}},
        "forward_proxy": {
            "listen": "127.0.0.1:0",
            "ca_cert_file": str(ca / "ca.crt"),
            "ca_key_file": str(ca / "ca.key"),
            **overrides,
        },
        **(top or {}),
    }
    return from_mapping(raw, {})


@dataclass
class Stack:
    proxy: ForwardProxy
    data_url: str
    ca: Path

    @property
    def proxy_url(self) -> str:
        assert self.proxy.address is not None
        return f"http://127.0.0.1:{self.proxy.address.port}"


@pytest.fixture
async def forward_stack(tmp_path) -> AsyncIterator:
    started: list[tuple[web.AppRunner, ForwardProxy]] = []

    async def start(config: Config) -> Stack:
        app = create_app(config, registry=CollectorRegistry(), rng=random.Random(7), environ={})
        runner, address = await start_site(app, config.listen.__class__("127.0.0.1", 0), shutdown_timeout=1)
        assert config.forward_proxy is not None
        proxy = await start_forward_proxy(config.forward_proxy, config=lambda: config, runner=runner)
        started.append((runner, proxy))
        return Stack(proxy, f"http://{address}", config.forward_proxy.ca_cert_file.parent)

    yield start
    for runner, proxy in started:
        await proxy.close()
        await runner.cleanup()


@pytest.fixture
def ca(tmp_path) -> Path:
    return make_ca(tmp_path / "ca", *ST_HOSTS, "127.0.0.1", "st.example.test")


async def raw_connect(
    stack: Stack, target: str, extra: bytes = b""
) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.address.port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + extra)
    head = await reader.readuntil(b"\r\n\r\n")
    return head, reader, writer


async def test_aiohttp_through_https_proxy_reaches_the_tenant_with_injected_credentials(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca))
    async with aiohttp.ClientSession() as session:
        url = f"https://api.servicetitan.io/crm/v2/tenant/{T1.tenant_id}/echo/hello?x=1"
        async with session.get(url, proxy=stack.proxy_url, ssl=client_context(ca / "ca.crt")) as resp:
            body = await resp.json()
            assert resp.status == 200, body
    assert body["path"] == f"/crm/v2/tenant/{T1.tenant_id}/echo/hello?x=1"
    headers = dict(body["headers"])
    assert headers["Authorization"].startswith("Bearer ") and headers["ST-App-Key"] == DEMO_APP_KEY
    assert simulator.api_requests >= 1


async def test_requests_through_https_proxy_works_the_same(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca))

    def call() -> requests.Response:
        with requests.Session() as session:
            session.trust_env = False  # only the proxy given here, whatever the machine's environment says
            return session.get(
                f"https://api.servicetitan.io/jpm/v2/tenant/{T1.tenant_id}/jobs/42",
                proxies={"https": stack.proxy_url},
                verify=str(ca / "ca.crt"),
                timeout=30,
            )

    resp = await asyncio.to_thread(call)
    assert resp.status_code == 200 and resp.json()["id"] == 42


async def test_the_leaf_names_exactly_the_connect_host_whatever_sni_the_client_sends(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca))
    head, reader, writer = await raw_connect(stack, "api.servicetitan.io:443")
    assert head.startswith(b"HTTP/1.1 200 ")
    context = ssl.create_default_context(cafile=str(ca / "ca.crt"))
    context.check_hostname = False  # the client asks for another name; the proxy must not follow it
    await writer.start_tls(context, server_hostname="evil.example.com")
    cert = writer.get_extra_info("peercert")
    assert cert["subjectAltName"] == (("DNS", "api.servicetitan.io"),)
    writer.close()


async def test_another_host_gets_403_and_nothing_is_dialled(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca))
    dialled = []
    bystander = await asyncio.start_server(lambda r, w: dialled.append(w), "127.0.0.1", 0)
    port = bystander.sockets[0].getsockname()[1]
    try:
        for target in (
            f"127.0.0.1:{port}",
            "example.com:443",
            "api.servicetitan.io:8443",
            "api.servicetitan.io.evil.com:443",
        ):
            head, reader, writer = await raw_connect(stack, target)
            assert head.startswith(b"HTTP/1.1 403 "), (target, head)
            assert b"X-ST-Proxy-Error: connect_refused" in head
            body = json.loads(await reader.read())  # then the connection is closed
            assert body["status"] == 403 and target in body["detail"]
            assert body["type"] == "tag:st-credential-proxy,2026:problem:connect_refused"
            writer.close()
    finally:
        bystander.close()
    assert dialled == []


async def test_other_hosts_tunnel_relays_tls_it_cannot_read(simulator, forward_stack, ca, tmp_path):
    stack = await forward_stack(production_at(simulator, ca, other_hosts="tunnel"))
    # A server with a certificate from a CA the proxy never saw: only an untouched relay lets the handshake succeed.
    elsewhere = make_ca(tmp_path / "elsewhere")
    server = issue(elsewhere, tmp_path / "server", "127.0.0.1")
    async with bare_tls_server(server / "tls.crt", server / "tls.key") as port:
        head, reader, writer = await raw_connect(stack, f"127.0.0.1:{port}")
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        await writer.start_tls(client_context(elsewhere / "ca.crt"), server_hostname="127.0.0.1")
        assert await reader.read(2) == b"ok"
        writer.close()


async def test_tunnel_to_a_closed_port_answers_502(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca, other_hosts="tunnel"))
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    head, reader, writer = await raw_connect(stack, f"127.0.0.1:{port}")
    assert head.startswith(b"HTTP/1.1 502 ") and b"upstream_unreachable" in head
    writer.close()


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (
            b"GET https://api.servicetitan.io/crm/v2/tenant/1/customers HTTP/1.1\r\nHost: api.servicetitan.io\r\n\r\n",
            405,
        ),
        (
            b"GET http://api.servicetitan.io/crm/v2/tenant/1/customers HTTP/1.1\r\nHost: api.servicetitan.io\r\n\r\n",
            405,
        ),
        (b"CONNECT api.servicetitan.io HTTP/1.1\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
        (b"CONNECT api.servicetitan.io:443 HTTP/1.1\r\nX: " + b"a" * 9000, 431),
    ],
)
async def test_anything_but_a_well_formed_connect_is_refused(simulator, forward_stack, ca, request_head, status):
    stack = await forward_stack(production_at(simulator, ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.address.port)
    writer.write(request_head)
    answer = await reader.read()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
    writer.close()
    assert simulator.api_requests == 0


async def test_a_client_that_does_not_trust_the_local_ca_gets_nothing(simulator, forward_stack, ca, tmp_path):
    stack = await forward_stack(production_at(simulator, ca))
    stranger = make_ca(tmp_path / "stranger")
    async with aiohttp.ClientSession() as session:
        url = f"https://api.servicetitan.io/crm/v2/tenant/{T1.tenant_id}/customers"
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(url, proxy=stack.proxy_url, ssl=client_context(stranger / "ca.crt"))
    assert simulator.api_requests == 0


async def test_every_data_port_rule_holds_inside_the_tunnel(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca))
    async with aiohttp.ClientSession() as session:
        for path, status, code in (
            ("/crm/v2/tenant/999/customers", 403, "unknown_tenant"),
            ("/crm/v2/customers", 400, "tenant_required"),
        ):
            async with session.get(
                "https://api.servicetitan.io" + path, proxy=stack.proxy_url, ssl=client_context(ca / "ca.crt")
            ) as resp:
                assert (resp.status, resp.headers.get("X-ST-Proxy-Error")) == (status, code)
    assert simulator.api_requests == 0


async def test_a_configured_environment_host_is_intercepted_on_its_port(simulator, forward_stack, ca):
    custom = {"auth_url": "https://st.example.test:9443/connect/token", "api_url": "https://st.example.test:9443"}
    config = production_at(simulator, ca, environments={"custom": custom})
    stack = await forward_stack(config)
    head, reader, writer = await raw_connect(stack, "st.example.test:9443")
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()


def test_the_leaf_cache_is_bounded_and_reuses_leaves():
    cache = LeafCache(LocalCA.create(), size=2)
    first = cache.context("auth.servicetitan.io")
    assert cache.context("auth.servicetitan.io") is first and cache.issued == 1
    cache.context("api.servicetitan.io")
    cache.context("api-integration.servicetitan.io")
    assert len(cache) == 2 and cache.issued == 3
    assert cache.context("auth.servicetitan.io") is not first  # evicted, made again
    assert first.connect_host == "auth.servicetitan.io"


async def test_tunnel_host_tells_a_tunnelled_request_from_a_direct_one(simulator, forward_stack, ca):
    seen: list[str | None] = []
    stack = await forward_stack(production_at(simulator, ca))
    app = web.Application()

    async def record(request: web.Request) -> web.Response:
        seen.append(tunnel_host(request))
        return web.Response(text="ok")

    app.router.add_get("/", record)
    runner, address = await start_site(app, stack.proxy.address.__class__("127.0.0.1", 0))
    try:
        proxy = ForwardProxy(
            stack.proxy._settings,
            config=stack.proxy._config,
            server=runner.server,
            leaves=stack.proxy.leaves,
        )
        await proxy.start()
        async with aiohttp.ClientSession() as session:
            async with session.get(
                "https://api.servicetitan.io/",
                proxy=f"http://127.0.0.1:{proxy.address.port}",
                ssl=client_context(ca / "ca.crt"),
            ) as resp:
                assert resp.status == 200
            async with session.get(f"http://{address}/") as resp:
                assert resp.status == 200
        await proxy.close()
    finally:
        await runner.cleanup()
    assert seen == ["api.servicetitan.io", None]


async def tunnel_proxy(stack: Stack, **timeouts) -> ForwardProxy:
    """A second listener on the same data runner and CA, with short timeouts for the tests that wait for one."""
    proxy = ForwardProxy(
        stack.proxy._settings,
        config=stack.proxy._config,
        server=stack.proxy._server,
        leaves=stack.proxy.leaves,
        **timeouts,
    )
    await proxy.start()
    return proxy


async def test_a_client_that_sends_no_head_in_time_gets_408(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca))
    proxy = await tunnel_proxy(stack, head_timeout=0.2)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.address.port)
        writer.write(b"CONNECT api.servicetitan.io:443 HTTP/1.1\r\n")  # and nothing more
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 408 ")
        writer.close()
    finally:
        await proxy.close()


async def test_a_tunnel_relays_large_bodies_both_ways_and_half_closes(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca, other_hosts="tunnel"))
    payload = random.Random(1).randbytes(3 * 1024 * 1024)

    async def echo_then_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = await reader.read()  # until the client's half-close
        writer.write(hashlib.sha256(received).hexdigest().encode() + b"\n" + payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo_then_bye, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        head, reader, writer = await raw_connect(stack, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        digest = await reader.readline()
        back = await reader.read()
        assert digest.strip().decode() == hashlib.sha256(payload).hexdigest()
        assert back == payload
        writer.close()
    finally:
        server.close()


@contextlib.asynccontextmanager
async def tunnel_to_a_silent_host(
    proxy: ForwardProxy,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Event]]:
    """A tunnel through ``proxy`` to a loopback server that never writes; yields the app's side of it and an event
    set when the server sees its side closed."""
    far_side_closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()
        far_side_closed.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.address.port)
        writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        yield reader, writer, far_side_closed
        writer.close()
    finally:
        server.close()


async def test_an_idle_tunnel_is_closed(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca, other_hosts="tunnel"))
    proxy = await tunnel_proxy(stack, tunnel_idle_timeout=0.3)
    try:
        async with tunnel_to_a_silent_host(proxy) as (reader, _, far_side_closed):
            assert await asyncio.wait_for(reader.read(), 10) == b""  # the proxy closed it: no bytes for 0.3 s
            await asyncio.wait_for(far_side_closed.wait(), 10)  # and the far side too
    finally:
        await proxy.close()


async def test_closing_the_forward_proxy_closes_its_open_tunnels(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca, other_hosts="tunnel"))
    proxy = await tunnel_proxy(stack)
    async with tunnel_to_a_silent_host(proxy) as (reader, _, far_side_closed):
        await proxy.close()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        await asyncio.wait_for(far_side_closed.wait(), 10)


async def test_inside_a_tunnel_the_connect_stands_for_the_required_header(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca, top={"security": {"require_header": "X-ST-Proxy"}}))
    path = f"/crm/v2/tenant/{T1.tenant_id}/customers"
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.data_url + path) as direct:
            assert (direct.status, direct.headers.get("X-ST-Proxy-Error")) == (403, "header_required")
        async with session.get(
            "https://api.servicetitan.io" + path, proxy=stack.proxy_url, ssl=client_context(ca / "ca.crt")
        ) as tunnelled:
            assert tunnelled.status == 200


async def test_clients_authenticate_inside_the_tunnel_like_on_the_data_port(simulator, forward_stack, ca):
    clients = {"billing-sync": {"secret": {"value": "a-local-client-secret-of-32-chars!"}, "tenants": [T1.tenant_id]}}
    stack = await forward_stack(production_at(simulator, ca, top={"clients": clients}))
    url = f"https://api.servicetitan.io/crm/v2/tenant/{T1.tenant_id}/customers"
    trust = client_context(ca / "ca.crt")
    async with aiohttp.ClientSession() as session:
        async with session.get(url, proxy=stack.proxy_url, ssl=trust) as anonymous:
            assert (anonymous.status, anonymous.headers.get("X-ST-Proxy-Error")) == (401, "client_unauthorized")
        form = {
            "grant_type": "client_credentials",
            "client_id": "billing-sync",
            "client_secret": clients["billing-sync"]["secret"]["value"],
        }
        async with session.post(
            "https://auth.servicetitan.io/connect/token", data=form, proxy=stack.proxy_url, ssl=trust
        ) as issued:
            assert issued.status == 200
            token = (await issued.json())["access_token"]
        async with session.get(url, proxy=stack.proxy_url, ssl=trust, headers={"Authorization": token}) as resp:
            assert resp.status == 200  # the bare local token, as ServiceTitan's own examples send it
    assert simulator.api_requests == 1


async def test_curl_through_the_forward_proxy_with_the_local_ca(simulator, forward_stack, ca):
    stack = await forward_stack(production_at(simulator, ca))
    curl = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--proxy",
        stack.proxy_url,
        "--cacert",
        str(ca / "ca.crt"),
        f"https://api.servicetitan.io/jpm/v2/tenant/{T1.tenant_id}/jobs/42",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(curl.communicate(), 30)
    assert curl.returncode == 0, err.decode()
    assert json.loads(out)["id"] == 42


async def test_httpx_with_https_proxy_and_ssl_cert_file_from_its_environment(simulator, forward_stack, ca, tmp_path):
    """The docs' recipe as an app would use it: nothing in the code, only HTTPS_PROXY and a bundle of the usual roots
    plus the local CA in SSL_CERT_FILE (which replaces httpx's roots rather than adding to them)."""
    stack = await forward_stack(production_at(simulator, ca))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + (ca / "ca.crt").read_bytes())
    script = f"import httpx; print(httpx.get('https://api.servicetitan.io/jpm/v2/tenant/{T1.tenant_id}/jobs/42').text)"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "HTTPS_PROXY": stack.proxy_url, "SSL_CERT_FILE": str(bundle)},
    )
    out, err = await asyncio.wait_for(child.communicate(), 30)
    assert child.returncode == 0, err.decode()
    assert json.loads(out)["id"] == 42


async def test_a_host_the_ca_may_not_sign_is_refused_and_the_log_line_says_why(
    simulator, forward_stack, tmp_path, captured_logs
):
    narrow = make_ca(tmp_path / "narrow", "api.servicetitan.io", "127.0.0.1")
    stack = await forward_stack(production_at(simulator, narrow))
    head, reader, writer = await raw_connect(stack, "auth.servicetitan.io:443")
    assert head.startswith(b"HTTP/1.1 403 ") and b"X-ST-Proxy-Error: connect_refused" in head
    body = json.loads(await reader.read())
    assert "the local CA cannot sign auth.servicetitan.io" in body["detail"]
    writer.close()
    (line,) = [json.loads(x) for x in captured_logs().splitlines() if '"event": "connect"' in x]
    assert (line["outcome"], line["error"], line["target"]) == (
        "refused",
        "connect_refused",
        "auth.servicetitan.io:443",
    )
    assert line["reason"] == body["detail"]
