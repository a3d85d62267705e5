"""TLS on the data port of a real `st-proxy serve` process: certificates made by `st-proxy certs`, rotation while it
runs (no restart, no dropped request), a broken renewal kept out, and client certificates (mTLS) that can be revoked
by removing their CA from the bundle."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import T1
from cryptography import x509
from serve_process import ServeProcess, poll_until, write_config
from tls_helpers import client_context, issue, issue_client, make_ca, replace_file

from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS


def tls_config(tmp_path: Path, sim, server: Path, client_ca: Path | None = None, **sections) -> Path:
    tls = {"cert_file": str(server / "tls.crt"), "key_file": str(server / "tls.key")}
    if client_ca is not None:
        tls["client_ca_file"] = str(client_ca)
    return write_config(
        tmp_path,
        auth_url=sim.auth_url,
        api_url=sim.base_url,
        tenants=DEMO_TENANTS,
        app_key=DEMO_APP_KEY,
        tls=tls,
        **sections,
    )


@pytest.fixture
async def serve(tmp_path):
    started: list[ServeProcess] = []

    async def start(config: Path, **kwargs) -> ServeProcess:
        proc = await ServeProcess.start(config, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        await proc.close()


def https(proc: ServeProcess) -> str:
    return proc.url.replace("http://", "https://")


async def serial_served(proc: ServeProcess, ca_file: Path, client: tuple[Path, Path] | None = None) -> int:
    """The serial number of the certificate a *new* connection to the data port gets."""
    port = int(proc.url.rsplit(":", 1)[1])
    context = client_context(ca_file, client)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


def cert_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def cert_expiry(path: Path) -> float:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


async def expiry_metric(proc: ServeProcess) -> float:
    """What /metrics says about the data port's certificate in use."""
    async with aiohttp.ClientSession() as session:
        async with session.get(proc.admin_url + "/metrics") as resp:
            text = await resp.text()
    for line in text.splitlines():
        if line.startswith('st_proxy_tls_certificate_expiry_timestamp_seconds{certificate="data_port"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no data_port expiry series in /metrics")


async def get_customers(base: str, context: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/crm/v2/tenant/{T1.tenant_id}/customers", ssl=context) as resp:
            await resp.read()
            return resp.status


async def test_the_data_port_speaks_tls_with_a_certificate_from_the_certs_command(simulator, serve, tmp_path):
    ca = make_ca(tmp_path / "ca", "localhost", "127.0.0.1")
    server = issue(ca, tmp_path / "server", "localhost", "127.0.0.1")
    proc = await serve(tls_config(tmp_path, simulator, server))
    assert proc.with_event("start")[0]["tls"] is True
    assert await get_customers(https(proc), client_context(ca / "ca.crt")) == 200
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to a TLS port gets no HTTP answer
            await session.get(proc.url + f"/crm/v2/tenant/{T1.tenant_id}/customers")


async def test_a_renewed_certificate_is_served_to_new_connections_without_dropping_a_request(
    simulator, serve, tmp_path
):
    ca = make_ca(tmp_path / "ca", "localhost", "127.0.0.1")
    server = issue(ca, tmp_path / "server", "localhost", "127.0.0.1")
    proc = await serve(tls_config(tmp_path, simulator, server))
    old_serial = cert_serial(server / "tls.crt")
    assert await serial_served(proc, ca / "ca.crt") == old_serial

    async with aiohttp.ClientSession() as session:
        # A slow download in flight across the renewal: 8 chunks, 0.25 s apart.
        url = f"{https(proc)}/crm/v2/tenant/{T1.tenant_id}/download?bytes=8192&chunk=1024&delay=0.25"
        async with session.get(url, ssl=client_context(ca / "ca.crt")) as slow:
            assert slow.status == 200
            assert await expiry_metric(proc) == cert_expiry(server / "tls.crt")
            issue(ca, server, "localhost", "127.0.0.1", days=30)  # renewed in place, as cert-manager does
            new_serial = cert_serial(server / "tls.crt")
            await proc.wait_event("tls_reloaded")
            assert await serial_served(proc, ca / "ca.crt") == new_serial != old_serial
            assert await expiry_metric(proc) == cert_expiry(server / "tls.crt")
            body = await slow.read()
    assert len(body) == 8192
    assert await get_customers(https(proc), client_context(ca / "ca.crt")) == 200


async def test_a_broken_or_mismatched_renewal_keeps_the_old_certificate(simulator, serve, tmp_path):
    ca = make_ca(tmp_path / "ca", "localhost", "127.0.0.1")
    server = issue(ca, tmp_path / "server", "localhost", "127.0.0.1")
    proc = await serve(tls_config(tmp_path, simulator, server))
    serial = cert_serial(server / "tls.crt")
    good_key = (server / "tls.key").read_bytes()
    expiry = await expiry_metric(proc)

    other = issue(ca, tmp_path / "other", "localhost")
    replace_file(server / "tls.key", (other / "tls.key").read_bytes())  # a key that is not this certificate's
    failed = await proc.wait_event("config_reload_failed")
    assert "the key does not belong to the certificate" in " ".join(failed["problems"])
    assert await serial_served(proc, ca / "ca.crt") == serial

    replace_file(server / "tls.crt", b"not a certificate\n")
    await proc.wait_event("config_reload_failed", count=2)
    assert await serial_served(proc, ca / "ca.crt") == serial
    assert await get_customers(https(proc), client_context(ca / "ca.crt")) == 200

    async def failures() -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(proc.admin_url + "/metrics") as resp:
                text = await resp.text()
        return 'st_proxy_config_reloads_total{result="failure"} 2.0' in text

    assert await poll_until(failures, what="two failed reloads counted")
    assert await expiry_metric(proc) == expiry  # the certificate still in use, not the refused one
    assert "PRIVATE KEY" not in proc.output() and good_key.decode() not in proc.output()


async def test_client_certificates_are_required_and_a_removed_ca_stops_being_trusted(simulator, serve, tmp_path):
    ca = make_ca(tmp_path / "ca", "localhost", "127.0.0.1")
    server = issue(ca, tmp_path / "server", "localhost", "127.0.0.1")
    team_a, team_b = make_ca(tmp_path / "team-a"), make_ca(tmp_path / "team-b")
    client_a = issue_client(team_a, tmp_path / "client-a", "billing-sync")
    client_b = issue_client(team_b, tmp_path / "client-b", "reports")
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes((team_a / "ca.crt").read_bytes() + (team_b / "ca.crt").read_bytes())
    proc = await serve(tls_config(tmp_path, simulator, server, client_ca=bundle))

    trust = ca / "ca.crt"
    assert await get_customers(https(proc), client_context(trust, client_a)) == 200
    assert await get_customers(https(proc), client_context(trust, client_b)) == 200
    with pytest.raises(aiohttp.ClientError):
        await get_customers(https(proc), client_context(trust))  # no certificate
    stranger = issue_client(make_ca(tmp_path / "stranger"), tmp_path / "client-x", "x")
    with pytest.raises(aiohttp.ClientError):
        await get_customers(https(proc), client_context(trust, stranger))

    replace_file(bundle, (team_b / "ca.crt").read_bytes())  # team A's CA is removed
    await proc.wait_event("tls_reloaded")
    with pytest.raises(aiohttp.ClientError):
        await get_customers(https(proc), client_context(trust, client_a))
    assert await get_customers(https(proc), client_context(trust, client_b)) == 200


def run_serve(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "st_proxy", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_proxy_refuses_to_start_when_its_egress_proxy_is_its_own_forward_proxy(simulator, tmp_path):
    ca = make_ca(tmp_path / "ca")
    config = write_config(
        tmp_path,
        auth_url=simulator.auth_url,
        api_url=simulator.base_url,
        tenants=DEMO_TENANTS,
        app_key=DEMO_APP_KEY,
        forward_proxy={
            "listen": "127.0.0.1:18443",
            "ca_cert_file": str(ca / "ca.crt"),
            "ca_key_file": str(ca / "ca.key"),
        },
    )
    env = {"PATH": "/usr/bin:/bin", "HTTPS_PROXY": "http://user:hunter2-proxy-pass@localhost:18443"}
    result = run_serve(config, env)
    assert result.returncode == 2, result.stderr
    assert "env.HTTPS_PROXY: points at this proxy's own forward_proxy.listen 127.0.0.1:18443" in result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_a_certificate_that_does_not_match_its_key_stops_the_start_with_exit_2(simulator, tmp_path):
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "server", "localhost")
    other = issue(ca, tmp_path / "other", "localhost")
    (server / "tls.key").write_bytes((other / "tls.key").read_bytes())
    result = run_serve(tls_config(tmp_path, simulator, server), {"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip() == "tls.cert_file: the key does not belong to the certificate"
