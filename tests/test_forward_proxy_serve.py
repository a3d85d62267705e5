"""The forward-proxy mode in a real `st-proxy serve` process: tunnels served by the data port's request path, the CA
renewed while it runs, and tunnelled requests drained on SIGTERM like any other."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest
from conftest import T1
from cryptography import x509
from serve_process import ServeProcess, poll_until, write_config
from tls_helpers import client_context, make_ca, replace_file

from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS

API = "https://api.servicetitan.io"


def forward_config(tmp_path: Path, sim, ca: Path, **sections) -> Path:
    path = write_config(
        tmp_path,
        auth_url=sim.auth_url,
        api_url=sim.base_url,
        tenants=DEMO_TENANTS,
        app_key=DEMO_APP_KEY,
        forward_proxy={"listen": "127.0.0.1:0", "ca_cert_file": str(ca / "ca.crt"), "ca_key_file": str(ca / "ca.key")},
        shutdown={"drain_seconds": 0, "timeout_seconds": 20},
        **sections,
    )
    # The tenants' environment is the built-in production one, pointed at the simulator.
    text = path.read_text().replace("environment: sim", "environment: production").replace("  sim:", "  production:")
    path.write_text(text)
    return path


@pytest.fixture
async def proxy_process():
    started: list[ServeProcess] = []

    async def start(config: Path) -> tuple[ServeProcess, str]:
        proc = await ServeProcess.start(config)
        started.append(proc)
        return proc, "http://" + proc.with_event("start")[0]["forward_proxy_listen"]

    yield start
    for proc in started:
        await proc.close()


async def leaf_verifies(proxy_url: str, trust: Path) -> bool:
    """Does a new tunnel to api.servicetitan.io present a certificate that ``trust`` (one CA) verifies?"""
    host, port = proxy_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"CONNECT api.servicetitan.io:443 HTTP/1.1\r\nHost: api.servicetitan.io:443\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        try:
            await writer.start_tls(client_context(trust), server_hostname="api.servicetitan.io")
        except ssl.SSLCertVerificationError:
            return False
        return True
    finally:
        writer.close()


async def test_tunnels_through_the_running_proxy_reach_the_tenant(simulator, proxy_process, tmp_path):
    ca = make_ca(tmp_path / "ca", "api.servicetitan.io", "auth.servicetitan.io")
    proc, proxy_url = await proxy_process(forward_config(tmp_path, simulator, ca))
    async with aiohttp.ClientSession() as session:
        url = f"{API}/crm/v2/tenant/{T1.tenant_id}/customers?pageSize=3"
        async with session.get(url, proxy=proxy_url, ssl=client_context(ca / "ca.crt")) as resp:
            page = await resp.json()
    assert resp.status == 200 and len(page["data"]) == 3
    connect = await proc.wait_event("connect")
    assert (connect["target"], connect["outcome"]) == ("api.servicetitan.io:443", "intercepted")

    async def access_line():
        return [e for e in proc.events if e.get("path") == f"/crm/v2/tenant/{T1.tenant_id}/customers"]

    (access,) = await poll_until(access_line, what="the tunnelled request's access log line")
    assert access["status"] == 200 and access["tenant"] == T1.tenant_id

    reader, writer = await asyncio.open_connection(*proxy_url.removeprefix("http://").rsplit(":", 1))
    writer.write(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 403 ")
    writer.close()
    async with aiohttp.ClientSession() as session:
        async with session.get(proc.admin_url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'st_proxy_forward_proxy_connects_total{outcome="intercepted"} 1.0' in metrics
    assert 'st_proxy_forward_proxy_connects_total{outcome="refused"} 1.0' in metrics
    assert 'st_proxy_forward_proxy_connects_total{outcome="handshake_failed"} 0.0' in metrics
    ca_expiry = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes()).not_valid_after_utc.timestamp()
    # Compared as numbers: the exposition prints the shortest repr (2.11126254e+09, not 2.111262540e+09).
    prefix = 'st_proxy_tls_certificate_expiry_timestamp_seconds{certificate="forward_proxy_ca"} '
    (exposed,) = [float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix)]
    assert exposed == ca_expiry


async def test_a_renewed_ca_signs_the_next_tunnels_and_a_broken_one_is_kept_out(simulator, proxy_process, tmp_path):
    ca = make_ca(tmp_path / "ca", "api.servicetitan.io")
    proc, proxy_url = await proxy_process(forward_config(tmp_path, simulator, ca))
    old = tmp_path / "old-ca.crt"
    old.write_bytes((ca / "ca.crt").read_bytes())
    assert await leaf_verifies(proxy_url, old)

    renewed = make_ca(tmp_path / "renewed", "api.servicetitan.io")
    replace_file(ca / "ca.key", (renewed / "ca.key").read_bytes())
    replace_file(ca / "ca.crt", (renewed / "ca.crt").read_bytes())
    await proc.wait_event("forward_proxy_ca_reloaded")
    assert await leaf_verifies(proxy_url, renewed / "ca.crt")
    assert not await leaf_verifies(proxy_url, old)  # the leaves the old CA signed were dropped with it

    before = len(proc.with_event("config_reload_failed"))  # the renewal above may have shown a half-written pair
    replace_file(ca / "ca.key", b"garbage\n")
    failed = await proc.wait_event("config_reload_failed", count=before + 1)
    assert "forward_proxy.ca_key_file" in " ".join(failed["problems"])
    assert await leaf_verifies(proxy_url, renewed / "ca.crt")  # still the renewed CA's leaves


async def test_a_tunnelled_download_in_flight_finishes_after_sigterm(simulator, proxy_process, tmp_path):
    ca = make_ca(tmp_path / "ca", "api.servicetitan.io")
    proc, proxy_url = await proxy_process(forward_config(tmp_path, simulator, ca))
    url = f"{API}/crm/v2/tenant/{T1.tenant_id}/download?bytes=8192&chunk=1024&delay=0.2"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, proxy=proxy_url, ssl=client_context(ca / "ca.crt")) as resp:
            assert resp.status == 200
            proc.send(signal.SIGTERM)
            await proc.wait_event("listener_closed")
            body = await resp.read()
    assert len(body) == 8192
    assert await proc.wait_exit() == 0
