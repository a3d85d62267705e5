"""A real ServiceTitan client library from PyPI, unchanged, through the proxy (docs/security.md, "A client library
that fetches its own token").

servicepytan (https://pypi.org/project/servicepytan/) fetches a token from ``{auth_root}/connect/token`` with
client_secret_post before every call and sends it as a bare ``Authorization`` value with ``ST-App-Key``. Its
connection is a dict whose ``auth_root`` and ``api_root`` are set from the environment name; pointing both at the
proxy is the whole recipe. The app holds only a local client's name and secret, and an app key that means nothing.
"""

from __future__ import annotations

import asyncio

import pytest
from client_setup import BILLING, BILLING_SECRET, clients_config
from conftest import T1, T2


@pytest.fixture
def servicepytan(monkeypatch):
    # requests honours HTTP(S)_PROXY from the environment; these calls are for the proxy on loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    # Imported here: the library calls logging.basicConfig() at import, which at collection time would attach a
    # stderr handler to the root logger for the whole test run.
    import servicepytan

    return servicepytan


def connect(servicepytan, proxy_url: str, tenant_id: str, secret: str = BILLING_SECRET) -> dict:
    conn = servicepytan.auth.servicepytan_connect(
        api_environment="production",
        app_key="anything-the-proxy-replaces-it",
        tenant_id=tenant_id,
        client_id=BILLING,
        client_secret=secret,
    )
    conn["auth_root"] = proxy_url  # the library posts to {auth_root}/connect/token
    conn["api_root"] = proxy_url  # and calls {api_root}/{folder}/v2/tenant/{tenant}/{endpoint}
    return conn


async def test_servicepytan_unchanged_works_through_the_proxy_with_only_a_local_client(
    servicepytan, simulator, start_proxy
):
    proxy = await start_proxy(clients_config(simulator), prewarm=False)
    conn = connect(servicepytan, proxy.url, T1.tenant_id)
    customers = servicepytan.Endpoint("crm", "customers", conn=conn)

    page = await asyncio.to_thread(customers.get_many, {"pageSize": 3})
    one = await asyncio.to_thread(customers.get_one, 7)
    jobs = await asyncio.to_thread(servicepytan.Endpoint("jpm", "jobs", conn=conn).get_many, {"pageSize": 1})

    assert [c["id"] for c in page["data"]] == [1, 2, 3]
    assert one == {"id": 7, "name": "customers 7"}
    assert len(jobs["data"]) == 1
    # The simulator checks each API call's token: they carried the tenant's real one. The proxy fetched it once;
    # the library, which asked for a token before each of its three calls, never reached the real token endpoint.
    assert simulator.token_requests_by_client == {T1.client_id: 1}
    assert simulator.token_requests == 1 and simulator.api_requests == 3
    scrape_text = await proxy.metrics_text()
    assert f'st_proxy_local_tokens_issued_total{{client="{BILLING}"}} 3.0' in scrape_text


async def test_servicepytan_is_refused_a_tenant_outside_its_client_and_a_wrong_secret(
    servicepytan, simulator, start_proxy
):
    import requests

    proxy = await start_proxy(clients_config(simulator), prewarm=False)
    other = servicepytan.Endpoint("crm", "customers", conn=connect(servicepytan, proxy.url, T2.tenant_id))
    with pytest.raises(requests.HTTPError) as refused:
        await asyncio.to_thread(other.get_many, {"pageSize": 1})
    assert refused.value.response.status_code == 403
    assert refused.value.response.headers["X-ST-Proxy-Error"] == "tenant_forbidden"

    wrong = servicepytan.Endpoint("crm", "customers", conn=connect(servicepytan, proxy.url, T1.tenant_id, "x" * 20))
    with pytest.raises(requests.HTTPError) as unauthorized:
        await asyncio.to_thread(wrong.get_many, {"pageSize": 1})
    assert unauthorized.value.response.status_code == 401  # at the local token endpoint: invalid_client
    assert simulator.token_requests == 0 and simulator.api_requests == 0
