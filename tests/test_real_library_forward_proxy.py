"""A real ServiceTitan library from PyPI that hard-codes https://auth.servicetitan.io and https://api.servicetitan.io
(servicepytan: module-level `requests` calls, no base-URL hook) runs unchanged through the forward-proxy mode.

The app's process holds only a local client's name and secret, `HTTPS_PROXY` pointing at the proxy's CONNECT listener,
and `REQUESTS_CA_BUNDLE` naming a bundle of requests' usual roots plus the local CA (the variable replaces the roots,
it does not add to them). The proxy runs as the real `st-proxy serve`, with the production environment pointed at the
simulator. The library's token request goes to auth.servicetitan.io/connect/token through the tunnel and is answered
by the proxy's local token endpoint; its API call goes to api.servicetitan.io and is forwarded with the tenant's real
token.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path

import certifi
import yaml
from conftest import T1
from serve_process import ServeProcess
from tls_helpers import make_ca

from st_proxy.devtools.simulator import DEMO_APP_KEY

ST_HOSTS = (
    "auth.servicetitan.io",
    "api.servicetitan.io",
    "auth-integration.servicetitan.io",
    "api-integration.servicetitan.io",
)
LOCAL_CLIENT, LOCAL_SECRET = "billing-sync", "local-client-secret-0123456789abcdef"

APP = textwrap.dedent(
    """
    import json, sys
    import servicepytan

    conn = servicepytan.auth.servicepytan_connect(
        api_environment="production",
        app_key="anything: the proxy sets the real one",
        tenant_id=sys.argv[1],
        client_id=sys.argv[2],
        client_secret=sys.argv[3],
    )
    page = servicepytan.Endpoint("crm", "customers", conn=conn).get_many({"pageSize": 2, "page": 1})
    job = servicepytan.Endpoint("jpm", "jobs", conn=conn).get_one(42)
    print(json.dumps({"page": page, "job": job}))
    """
)


def proxy_config(directory: Path, sim, ca: Path) -> Path:
    secrets = directory / "secrets"
    secrets.mkdir()
    (secrets / "client_secret").write_text(T1.client_secret)
    (secrets / "local_client").write_text(LOCAL_SECRET)
    raw = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "app_key": {"value": DEMO_APP_KEY},
        # The real tenant's production environment points at the simulator: nothing leaves this machine.
        "environments": {"production": {"auth_url": sim.auth_url, "api_url": sim.base_url}},
        "tenants": {
            T1.tenant_id: {"client_id": T1.client_id, "client_secret": {"file": str(secrets / "client_secret")}}
        },
        "clients": {LOCAL_CLIENT: {"secret": {"file": str(secrets / "local_client")}, "tenants": [T1.tenant_id]}},
        "forward_proxy": {
            "listen": "127.0.0.1:0",
            "ca_cert_file": str(ca / "ca.crt"),
            "ca_key_file": str(ca / "ca.key"),
        },
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


async def test_servicepytan_runs_unchanged_through_the_forward_proxy_with_local_credentials_only(simulator, tmp_path):
    ca = make_ca(tmp_path / "ca", *ST_HOSTS)  # the docs' recommendation: the CA may sign ServiceTitan's names only
    bundle = tmp_path / "trust.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes() + (ca / "ca.crt").read_bytes())
    proxy = await ServeProcess.start(proxy_config(tmp_path, simulator, ca))
    try:
        forward = proxy.with_event("start")[0]["forward_proxy_listen"]
        app = tmp_path / "app.py"
        app.write_text(APP)
        env = {
            "PATH": "/usr/bin:/bin",
            "HTTPS_PROXY": f"http://{forward}",
            "REQUESTS_CA_BUNDLE": str(bundle),
        }
        # Run without blocking this event loop: the simulator answers from it.
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(app),
            T1.tenant_id,
            LOCAL_CLIENT,
            LOCAL_SECRET,
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(child.communicate(), 60)
        stdout, stderr = out.decode(), err.decode()
        assert child.returncode == 0, stdout + stderr
        answer = json.loads(stdout)
        assert len(answer["page"]["data"]) == 2 and answer["page"]["page"] == 1
        assert answer["job"]["id"] == 42
        # The real token endpoint saw the proxy's fetch (the tenant's credentials), never the app's local ones.
        assert simulator.token_requests >= 1 and simulator.api_requests == 2
        connects = [e for e in proxy.events if e.get("event") == "connect"]
        assert {e["target"] for e in connects} == {"auth.servicetitan.io:443", "api.servicetitan.io:443"}
        assert all(e["outcome"] == "intercepted" for e in connects)
        # Its token requests were answered by the proxy's local token endpoint, never forwarded.
        token_lines = [e for e in proxy.events if e.get("path") == "/connect/token"]
        assert token_lines and all(e["status"] == 200 and e["client"] == LOCAL_CLIENT for e in token_lines)
        assert LOCAL_CLIENT not in simulator.token_requests_by_client
        assert T1.client_secret not in proxy.output() + stdout + stderr
    finally:
        await proxy.close()
