"""Callers of the data port (docs/security.md): authentication before routing and before any token work,
authorization before the tenant's existence is looked up, the wrong-secret throttle, require_header, and what the
metrics and the access log say. Real proxy and simulator on loopback."""

from __future__ import annotations

import json

import pytest
from client_setup import (
    BILLING,
    BILLING_SECRET,
    CLIENT_SECRETS,
    ODD,
    ODD_SECRET,
    OPS,
    OPS_SECRET,
    UNCONFIGURED,
    basic,
    bearer,
    clients_config,
    local_token,
)
from conftest import T1, T2, sim_config
from test_metrics import Scrape

from st_proxy.inbound.gate import INBOUND
from st_proxy.inbound.throttle import WINDOW_SECONDS, WRONG_SECRETS_ALLOWED


def customers(proxy, tenant=T1.tenant_id) -> str:
    return f"{proxy.url}/crm/v2/tenant/{tenant}/customers"


async def problem(resp) -> dict:
    assert resp.content_type == "application/problem+json"
    body = await resp.json(content_type=None)
    assert resp.headers["X-ST-Proxy-Error"] == body["type"].rsplit("-", 1)[-1] or body["type"].endswith(
        resp.headers["X-ST-Proxy-Error"]
    )
    return body


@pytest.fixture
async def proxy(simulator, start_proxy, clock):
    return await start_proxy(clients_config(simulator), prewarm=False, clock=clock)


async def echo_headers(proxy, headers, tenant=T1.tenant_id) -> dict[str, list[str]]:
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{tenant}/echo", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        seen: dict[str, list[str]] = {}
        for name, value in (await resp.json())["headers"]:
            seen.setdefault(name.lower(), []).append(value)
        return seen


# ---- authentication ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-local-token"},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + "bm9jb2xvbg=="},  # "nocolon"
        {"Authorization": "Digest username=x"},
        {"Authorization": "stp1.AAAA.BBBB"},
    ],
)
async def test_a_request_without_valid_credentials_gets_401_before_routing_and_before_any_token_work(
    proxy, simulator, headers
):
    # No tenant in the path: authentication is decided before routing (else this would be 400 tenant_required).
    async with proxy.session.get(proxy.url + "/no/tenant/here", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="st-proxy"'
        body = await problem(resp)
        assert body["tenant"] is None and resp.headers["X-ST-Proxy-Error"] == "client_unauthorized"
    async with proxy.session.get(customers(proxy), headers=headers) as resp:
        assert resp.status == 401
    assert simulator.token_requests == 0 and simulator.api_requests == 0


async def test_basic_raw_and_form_encoded_both_authenticate_and_the_upstream_sees_only_the_tenants_token(
    proxy, simulator
):
    for headers in (basic(ODD, ODD_SECRET), basic(ODD, ODD_SECRET, form_encoded=True)):
        seen = await echo_headers(proxy, headers, tenant=T2.tenant_id)
        (authorization,) = seen["authorization"]
        assert authorization.startswith("Bearer ") and authorization[7:] in simulator.issued_tokens
        assert ODD_SECRET not in json.dumps(seen)
    assert simulator.token_requests_by_client[T2.client_id] == 1


async def test_a_local_token_authenticates_with_bearer_and_bare_and_never_goes_upstream(proxy, simulator):
    token = await local_token(proxy, BILLING, BILLING_SECRET)
    for headers in (bearer(token), {"Authorization": token}):
        seen = await echo_headers(proxy, headers)
        assert token not in json.dumps(seen)
        assert seen["authorization"][0][7:] in simulator.issued_tokens
    assert token not in simulator.issued_tokens


async def test_two_authorization_headers_are_refused_as_ambiguous(proxy):
    headers = [("Authorization", basic(OPS, OPS_SECRET)["Authorization"])] * 2
    async with proxy.session.get(customers(proxy), headers=headers) as resp:
        assert resp.status == 401


async def test_a_wrong_secret_or_unknown_name_gets_401(proxy, simulator):
    for headers in (basic(BILLING, OPS_SECRET), basic("nobody", BILLING_SECRET), basic(BILLING, "")):
        async with proxy.session.get(customers(proxy), headers=headers) as resp:
            assert resp.status == 401
            assert BILLING_SECRET not in await resp.text()
    assert simulator.token_requests == 0


# ---- the wrong-secret throttle ----------------------------------------------------------------------------------
async def test_ten_wrong_secrets_in_a_minute_throttle_that_name_until_the_minute_is_over_the_right_one_still_works(
    proxy, clock
):
    wrong = basic(BILLING, "cl1.wrong-guess-0000000000")
    for _ in range(WRONG_SECRETS_ALLOWED):
        async with proxy.session.get(customers(proxy), headers=wrong) as resp:
            assert resp.status == 401
    clock.advance(20)
    async with proxy.session.get(customers(proxy), headers=wrong) as resp:
        assert resp.status == 429
        assert resp.headers["X-ST-Proxy-Error"] == "client_throttled"
        assert resp.headers["Retry-After"] == str(int(WINDOW_SECONDS - 20))
    async with proxy.session.get(customers(proxy), headers=basic(BILLING, BILLING_SECRET)) as resp:
        assert resp.status == 200  # the right secret is never throttled
    async with proxy.session.get(customers(proxy), headers=basic(OPS, OPS_SECRET + "x")) as resp:
        assert resp.status == 401  # another name is not affected
    clock.advance(WINDOW_SECONDS - 20)
    async with proxy.session.get(customers(proxy), headers=wrong) as resp:
        assert resp.status == 401  # the minute is over: answered again, counting anew
    scrape = Scrape(await proxy.metrics_text())
    assert scrape.value("st_proxy_client_auth_total", client=BILLING, result="throttled") == 1
    assert (
        scrape.value("st_proxy_client_auth_total", client=BILLING, result="unauthorized") == WRONG_SECRETS_ALLOWED + 1
    )


async def test_wrong_secrets_spread_over_more_than_a_minute_are_not_throttled(proxy, clock):
    wrong = basic(BILLING, "cl1.wrong-guess-0000000000")
    for _ in range(3 * WRONG_SECRETS_ALLOWED):
        async with proxy.session.get(customers(proxy), headers=wrong) as resp:
            assert resp.status == 401
        clock.advance(WINDOW_SECONDS / WRONG_SECRETS_ALLOWED + 0.5)


async def test_made_up_client_names_leave_no_state_behind(proxy):
    for i in range(300):
        async with proxy.session.get(customers(proxy), headers=basic(f"guess-{i}", "x" * 20)) as resp:
            assert resp.status == 401
    assert proxy.app[INBOUND].throttle._windows == {}
    scrape = Scrape(await proxy.metrics_text())
    assert scrape.value("st_proxy_client_auth_total", client="none", result="unauthorized") == 300
    assert {labels["client"] for labels in scrape.series("st_proxy_client_auth_total")} == {BILLING, OPS, ODD, "none"}


# ---- authorization ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tenant", [T2.tenant_id, UNCONFIGURED])
async def test_a_tenant_outside_the_clients_list_is_forbidden_configured_or_not_and_nothing_goes_upstream(
    proxy, simulator, tenant
):
    async with proxy.session.get(customers(proxy, tenant), headers=basic(BILLING, BILLING_SECRET)) as resp:
        assert resp.status == 403
        assert resp.headers["X-ST-Proxy-Error"] == "tenant_forbidden"
        assert (await problem(resp))["tenant"] == tenant
    assert simulator.token_requests == 0 and simulator.api_requests == 0


async def test_the_tenant_header_is_authorized_like_the_path(proxy, simulator):
    headers = {**basic(BILLING, BILLING_SECRET), "X-Tenant-ID": T2.tenant_id}
    async with proxy.session.get(proxy.url + "/crm/v2/customers", headers=headers) as resp:
        assert resp.status == 403 and resp.headers["X-ST-Proxy-Error"] == "tenant_forbidden"


async def test_a_star_client_naming_an_unconfigured_tenant_gets_unknown_tenant(proxy, simulator):
    async with proxy.session.get(customers(proxy, UNCONFIGURED), headers=basic(OPS, OPS_SECRET)) as resp:
        assert resp.status == 403 and resp.headers["X-ST-Proxy-Error"] == "unknown_tenant"
    for tenant in (T1.tenant_id, T2.tenant_id):
        async with proxy.session.get(customers(proxy, tenant), headers=basic(OPS, OPS_SECRET)) as resp:
            assert resp.status == 200


# ---- require_header ---------------------------------------------------------------------------------------------
async def test_require_header_is_checked_first_and_the_token_endpoint_is_exempt(simulator, start_proxy):
    proxy = await start_proxy(
        clients_config(simulator, security={"require_header": "X-ST-Proxy-Request"}), prewarm=False
    )
    async with proxy.session.get(customers(proxy)) as resp:  # no credentials either: the header is checked first
        assert resp.status == 403 and resp.headers["X-ST-Proxy-Error"] == "header_required"
        assert "X-ST-Proxy-Request" in (await problem(resp))["detail"]
    token = await local_token(proxy, BILLING, BILLING_SECRET)  # exempt: it needs client credentials anyway
    async with proxy.session.get(customers(proxy), headers={**bearer(token), "X-ST-Proxy-Request": "1"}) as resp:
        assert resp.status == 200
    assert simulator.token_requests == 1


async def test_require_header_works_without_clients_too(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator, security={"require_header": "X-ST-Proxy-Request"}), prewarm=False)
    async with proxy.session.get(customers(proxy)) as resp:
        assert resp.status == 403
    async with proxy.session.get(customers(proxy), headers={"x-st-proxy-request": ""}) as resp:
        assert resp.status == 200  # any value, any case of the name


@pytest.mark.parametrize("path", ["/connect%2Ftoken", "/connect%2ftoken", "/connect/token%2F"])
async def test_an_encoded_token_endpoint_path_is_not_exempt_from_require_header(simulator, start_proxy, path):
    # aiohttp decodes %2F in request.path: the exemption must match the path as sent, or a request that is then
    # routed (here by default_tenant) and forwarded would skip the header check.
    config = sim_config(
        simulator, security={"require_header": "X-ST-Proxy-Request"}, routing={"default_tenant": T1.tenant_id}
    )
    proxy = await start_proxy(config, prewarm=False)
    async with proxy.session.get(proxy.url + path) as resp:
        assert resp.status == 403 and resp.headers["X-ST-Proxy-Error"] == "header_required"
    assert simulator.api_requests == 0


# ---- what the metrics and the log say ---------------------------------------------------------------------------
async def test_every_configured_client_has_its_series_from_the_start(proxy):
    scrape = Scrape(await proxy.metrics_text())
    for name in (BILLING, OPS, ODD):
        for result in ("ok", "unauthorized", "forbidden", "throttled"):
            assert scrape.value("st_proxy_client_auth_total", client=name, result=result) == 0
        assert scrape.value("st_proxy_local_tokens_issued_total", client=name) == 0


async def test_results_are_counted_and_the_access_line_names_the_client(proxy, captured_logs):
    async with proxy.session.get(customers(proxy), headers=basic(BILLING, BILLING_SECRET)) as resp:
        assert resp.status == 200
    async with proxy.session.get(customers(proxy, T2.tenant_id), headers=basic(BILLING, BILLING_SECRET)) as resp:
        assert resp.status == 403
    await local_token(proxy, OPS, OPS_SECRET)
    scrape = Scrape(await proxy.metrics_text())
    assert scrape.value("st_proxy_client_auth_total", client=BILLING, result="ok") == 1
    assert scrape.value("st_proxy_client_auth_total", client=BILLING, result="forbidden") == 1
    assert scrape.value("st_proxy_local_tokens_issued_total", client=OPS) == 1
    lines = [json.loads(line) for line in captured_logs().splitlines()]
    access = [line for line in lines if line["logger"] == "st_proxy.access"]
    assert [(a["client"], a["status"]) for a in access] == [(BILLING, 200), (BILLING, 403), (OPS, 200)]
    text = captured_logs()
    for secret in CLIENT_SECRETS:
        assert secret not in text
