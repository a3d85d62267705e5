"""Routing a request to a tenant (docs/configuration.md): header, then path, then default; the 400 / 403 answers."""

from __future__ import annotations

import pytest
from conftest import T1, T2, raw_exchange, sim_config
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from st_proxy.config import RoutingConfig
from st_proxy.errors import RequestError, TenantMismatch, TenantRequired
from st_proxy.http.routing import resolve_tenant, tenant_from_header, tenant_from_path

ROUTING = RoutingConfig()  # X-Tenant-ID, no default


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


# ---- the pure functions -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "tenant"),
    [
        ("/telecom/v3/tenant/5/calls", "5"),
        ("/crm/v2/tenant/5", "5"),
        ("/crm/v2/tenant/5/", "5"),
        ("/jpm/v2/tenant/1234567/jobs/42?x=1", "1234567"),
        ("/crm/v10/tenant/18446744073709551615/customers", "18446744073709551615"),
        ("/crm/v2/tenant/5x/", None),
        ("/crm/tenant/5/", None),  # no version segment
        ("/crm/v/tenant/5/", None),
        ("/v2/tenant/5/", None),  # no module segment
        ("/a/b/v2/tenant/5/", None),  # two segments before the version
        ("/crm/v2/tenants/5/", None),
        ("/crm/v2/tenant//5/", None),
        ("crm/v2/tenant/5/", None),
        ("/crm/v2/tenant/\u0664\u0662/customers", None),  # Arabic-Indic digits are no tenant id
        ("/crm/v2/tenant/5\n", None),
        ("/crm/v2/tenant/-5/", None),
    ],
)
def test_the_tenant_segment_of_the_path_follows_the_servicetitan_url_shape(path, tenant):
    assert tenant_from_path(path) == tenant


def test_the_header_wins_over_nothing_and_agrees_with_the_path():
    assert resolve_tenant("/anything", headers(("X-Tenant-ID", "42")), ROUTING) == "42"
    assert resolve_tenant("/crm/v2/tenant/42/customers", headers(("x-tenant-id", " 42 ")), ROUTING) == "42"


def test_the_path_is_used_when_there_is_no_header():
    assert resolve_tenant("/crm/v2/tenant/7/customers", headers(), ROUTING) == "7"


def test_the_default_tenant_is_used_when_neither_header_nor_path_names_one():
    routing = RoutingConfig(default_tenant="99")
    assert resolve_tenant("/crm/v2/customers", headers(), routing) == "99"
    assert resolve_tenant("/crm/v2/tenant/7/customers", headers(), routing) == "7"  # the path beats the default
    assert resolve_tenant("/x", headers(("X-Tenant-ID", "8")), routing) == "8"  # and so does the header


def test_header_and_path_naming_different_tenants_is_a_mismatch():
    with pytest.raises(TenantMismatch) as caught:
        resolve_tenant("/crm/v2/tenant/7/customers", headers(("X-Tenant-ID", "8")), ROUTING)
    assert caught.value.tenant is None and caught.value.status == 400


def test_no_tenant_anywhere_is_tenant_required():
    with pytest.raises(TenantRequired) as caught:
        resolve_tenant("/crm/v2/customers", headers(), ROUTING)
    assert "X-Tenant-ID" in caught.value.detail


@pytest.mark.parametrize("value", ["acme", "", " ", "42x", "4 2", "-1", "1,2", "\u0664\u0662", "1" * 21])
def test_a_tenant_header_that_is_not_a_tenant_id_is_an_invalid_request(value):
    with pytest.raises(RequestError) as caught:
        resolve_tenant("/crm/v2/tenant/42/customers", headers(("X-Tenant-ID", value)), ROUTING)
    assert type(caught.value) is RequestError and caught.value.code == "invalid_request"


def test_a_tenant_header_sent_twice_with_different_ids_is_an_invalid_request():
    with pytest.raises(RequestError, match="more than once"):
        tenant_from_header(headers(("X-Tenant-ID", "1"), ("X-Tenant-ID", "2")), "X-Tenant-ID")
    assert tenant_from_header(headers(("X-Tenant-ID", "1"), ("X-Tenant-ID", "1")), "X-Tenant-ID") == "1"


def test_with_tenant_header_null_the_header_is_ignored():
    routing = RoutingConfig(tenant_header=None)
    assert resolve_tenant("/crm/v2/tenant/7/x", headers(("X-Tenant-ID", "8")), routing) == "7"
    assert resolve_tenant("/crm/v2/tenant/7/x", headers(("X-Tenant-ID", "not digits")), routing) == "7"
    with pytest.raises(TenantRequired) as caught:
        resolve_tenant("/x", headers(("X-Tenant-ID", "8")), routing)
    assert "header" not in caught.value.detail


def test_a_custom_tenant_header_name_is_honoured_case_insensitively():
    routing = RoutingConfig(tenant_header="X-Customer")
    assert resolve_tenant("/x", headers(("x-customer", "3")), routing) == "3"
    assert resolve_tenant("/crm/v2/tenant/4/x", headers(("X-Tenant-ID", "3")), routing) == "4"


def test_a_plain_mapping_of_headers_works_too():
    assert tenant_from_header({"X-Tenant-ID": "5"}, "X-Tenant-ID") == "5"
    assert tenant_from_header({}, "X-Tenant-ID") is None


# ---- through the proxy ------------------------------------------------------------------------------------------
async def test_the_path_tenant_is_routed_with_that_tenants_credentials(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T2.tenant_id}/customers") as resp:
        assert resp.status == 200
    assert simulator.token_requests_by_client == {T2.client_id: 1}


async def test_percent_encoded_digits_in_the_path_name_the_decoded_tenant(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    encoded = "".join(f"%{ord(c):02X}" for c in T1.tenant_id)
    async with proxy.session.get(URL(f"{proxy.url}/crm/v2/tenant/{encoded}/echo", encoded=True)) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["path"] == f"/crm/v2/tenant/{encoded}/echo"  # forwarded exactly as received
    assert simulator.token_requests_by_client == {T1.client_id: 1}


async def test_the_tenant_header_routes_and_is_not_forwarded(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    url = f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/echo"
    async with proxy.session.get(url, headers={"X-Tenant-ID": T1.tenant_id}) as resp:
        assert resp.status == 200
        sent = [name.lower() for name, _ in (await resp.json())["headers"]]
    assert "x-tenant-id" not in sent


async def test_with_tenant_header_null_the_header_is_forwarded_untouched(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator, routing={"tenant_header": None}), prewarm=False)
    url = f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/echo"
    async with proxy.session.get(url, headers={"X-Tenant-ID": "not-a-tenant"}) as resp:
        assert resp.status == 200
        sent = (await resp.json())["headers"]
    assert ["X-Tenant-ID", "not-a-tenant"] in sent


async def test_the_default_tenant_serves_requests_that_name_none(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator, routing={"default_tenant": T2.tenant_id}), prewarm=False)
    async with proxy.session.get(f"{proxy.url}/crm/v2/customers") as resp:
        await resp.read()
    assert simulator.token_requests_by_client == {T2.client_id: 1}  # the token was the default tenant's


@pytest.mark.parametrize(
    ("path", "sent", "status", "code", "tenant"),
    [
        ("/crm/v2/tenant/{t1}/customers", {"X-Tenant-ID": "{t2}"}, 400, "tenant_mismatch", None),
        ("/crm/v2/customers", {}, 400, "tenant_required", None),
        ("/crm/v2/tenant/{t1}/customers", {"X-Tenant-ID": "acme"}, 400, "invalid_request", None),
        ("/crm/v2/tenant/999/customers", {}, 403, "unknown_tenant", "999"),
        ("/crm/v2/customers", {"X-Tenant-ID": "999"}, 403, "unknown_tenant", "999"),
    ],
)
async def test_routing_errors_are_problem_responses_with_their_code(
    simulator, start_proxy, path, sent, status, code, tenant
):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    ids = {"t1": T1.tenant_id, "t2": T2.tenant_id}
    request_headers = {k: v.format(**ids) for k, v in sent.items()}
    request_headers["X-Request-ID"] = "req-routing-1"
    async with proxy.session.get(proxy.url + path.format(**ids), headers=request_headers) as resp:
        assert resp.status == status
        assert resp.content_type == "application/problem+json"
        assert resp.headers["X-ST-Proxy-Error"] == code
        body = await resp.json(content_type=None)
    assert body["status"] == status
    assert body["tenant"] == tenant
    assert body["request_id"] == "req-routing-1"
    assert body["type"] == f"tag:st-credential-proxy,2026:problem:{code}"  # RFC 4151 tag URI, docs/errors.md
    assert body["title"] and body["detail"]
    assert simulator.token_requests == 0 and simulator.api_requests == 0  # nothing left the proxy


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET http://example.com/crm/v2/tenant/1000001/customers HTTP/1.1",  # absolute-form (RFC 9112 section 3.2.2)
        b"CONNECT example.com:443 HTTP/1.1",  # authority-form: a tunnel to anywhere
    ],
)
async def test_only_origin_form_targets_are_forwarded(simulator, start_proxy, request_line):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    status, headers, body = await raw_exchange(
        proxy.url, request_line + b"\r\nHost: example.com\r\nConnection: close\r\n\r\n"
    )
    assert status == 400, body[:200]
    assert headers["x-st-proxy-error"] == "invalid_request"
    assert simulator.api_requests == 0 and simulator.token_requests == 0
