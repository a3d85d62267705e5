"""The bundled ServiceTitan simulator, exercised over a real loopback socket."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from urllib.parse import quote_plus

import pytest
from conftest import T1, T2, FakeClock
from multidict import CIMultiDict
from yarl import URL

from st_proxy.devtools.simulator import (
    DEMO_APP_KEY,
    DEMO_TENANTS,
    SimTenant,
    Simulator,
    describe,
    parse_tenant_spec,
)


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def post_token(session, sim, client_id=T1.client_id, secret=T1.client_secret, **form):
    data = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret, **form}
    async with session.post(sim.auth_url, data=data) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def token_for(session, sim, tenant: SimTenant = T1) -> str:
    status, body, _ = await post_token(session, sim, tenant.client_id, tenant.client_secret)
    assert status == 200, body
    return body["access_token"]


async def call(session, sim, path, token=None, *, bare=False, app_key=DEMO_APP_KEY, method="GET", **kwargs):
    """One API request; answers (status, parsed JSON or None, headers)."""
    headers = {}
    if app_key is not None:
        headers["ST-App-Key"] = app_key
    if token is not None:
        headers["Authorization"] = token if bare else f"Bearer {token}"
    async with session.request(method, f"{sim.base_url}{path}", headers=headers, **kwargs) as resp:
        raw = await resp.read()
        return resp.status, (json.loads(raw) if raw else None), resp.headers


# ---- token endpoint ---------------------------------------------------------------------------------------------
async def test_client_secret_post_gets_a_jwt_carrying_client_and_tenant_claims(make_simulator, session):
    sim = await make_simulator(clock=FakeClock())
    status, body, headers = await post_token(session, sim)
    assert status == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900 and body["scope"].startswith("tn.")
    assert headers["Cache-Control"] == "no-store"
    claims = claims_of(body["access_token"])
    assert claims["client_id"] == "cid.demo1" and claims["tenant"] == "1000001"
    assert claims["exp"] - claims["iat"] == 900 and claims["jti"]
    assert sim.issued_tokens == [body["access_token"]]
    assert sim.token_requests == 1 and sim.token_requests_by_client["cid.demo1"] == 1


async def test_client_secret_basic_decodes_form_encoded_credentials(make_simulator, session):
    odd = SimTenant("42", "cid.odd:+/ x", "cs1.a+b/c:d %&é")
    sim = await make_simulator(tenants=[odd])
    # RFC 6749 section 2.3.1: each part is form-urlencoded, then joined with ":" and base64-encoded.
    basic = base64.b64encode(f"{quote_plus(odd.client_id)}:{quote_plus(odd.client_secret)}".encode()).decode()
    async with session.post(
        sim.auth_url, data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert claims_of(body["access_token"])["tenant"] == "42"
    assert sim.token_requests_by_client[odd.client_id] == 1


async def test_wrong_secret_is_invalid_client_without_echoing_the_secret(make_simulator, session):
    sim = await make_simulator()
    async with session.post(
        sim.auth_url,
        data={"grant_type": "client_credentials", "client_id": T1.client_id, "client_secret": "cs1.wrong-guess"},
    ) as resp:
        text = await resp.text()
    assert resp.status == 400
    assert json.loads(text)["error"] == "invalid_client"
    assert "cs1.wrong-guess" not in text and T1.client_secret not in text
    assert sim.issued_tokens == []


async def test_unknown_client_is_invalid_client(make_simulator, session):
    sim = await make_simulator()
    status, body, _ = await post_token(session, sim, client_id="cid.nobody")
    assert (status, body["error"]) == (400, "invalid_client")
    assert sim.token_requests_by_client["cid.nobody"] == 1


async def test_a_grant_other_than_client_credentials_is_unsupported(make_simulator, session):
    sim = await make_simulator()
    status, body, _ = await post_token(session, sim, grant_type="password")
    assert (status, body) == (400, {"error": "unsupported_grant_type"})


async def test_a_json_token_request_is_an_invalid_request(make_simulator, session):
    sim = await make_simulator()
    async with session.post(sim.auth_url, json={"grant_type": "client_credentials"}) as resp:
        body = await resp.json()
    assert (resp.status, body["error"]) == (400, "invalid_request")
    assert sim.token_requests == 1 and sim.token_requests_by_client[""] == 1


async def test_fail_tokens_twice_then_the_third_request_succeeds(make_simulator, session):
    sim = await make_simulator()
    sim.fail_tokens(503, {"error": "temporarily_unavailable"}, times=2, headers={"Retry-After": "7"})
    first = await post_token(session, sim)
    second = await post_token(session, sim)
    third = await post_token(session, sim)
    assert first[0] == second[0] == 503
    assert first[1] == {"error": "temporarily_unavailable"} and first[2]["Retry-After"] == "7"
    assert third[0] == 200 and "access_token" in third[1]
    assert sim.token_requests == 3


async def test_fail_tokens_without_times_lasts_until_cleared(make_simulator, session):
    sim = await make_simulator()
    sim.fail_tokens(429, "slow down")
    for _ in range(3):
        async with session.post(sim.auth_url, data={}) as resp:
            assert (resp.status, await resp.text()) == (429, "slow down")
    sim.clear_failures()
    assert (await post_token(session, sim))[0] == 200


async def test_expires_in_follows_token_ttl_changes(make_simulator, session):
    sim = await make_simulator(token_ttl=60)
    assert (await post_token(session, sim))[1]["expires_in"] == 60
    sim.token_ttl = 5.5
    assert (await post_token(session, sim))[1]["expires_in"] == 5.5


async def test_each_issued_token_is_unique(make_simulator, session):
    sim = await make_simulator(clock=FakeClock())
    tokens = {await token_for(session, sim) for _ in range(5)}
    assert len(tokens) == 5 and len(sim.issued_tokens) == 5


async def test_set_secret_rejects_the_old_secret_and_accepts_the_new(make_simulator, session):
    sim = await make_simulator()
    old_token = await token_for(session, sim)
    sim.set_secret(T1.tenant_id, "cs1.rotated")
    assert (await post_token(session, sim))[1]["error"] == "invalid_client"
    assert (await post_token(session, sim, secret="cs1.rotated"))[0] == 200
    # Rotating the secret does not revoke tokens already issued.
    assert (await call(session, sim, "/crm/v2/tenant/1000001/customers", old_token))[0] == 200


async def test_add_tenant_makes_a_new_client_usable(make_simulator, session):
    sim = await make_simulator()
    sim.add_tenant(SimTenant("555", "cid.new", "cs1.new"))
    token = await token_for(session, sim, SimTenant("555", "cid.new", "cs1.new"))
    assert (await call(session, sim, "/jpm/v3/tenant/555/jobs", token))[0] == 200


# ---- API authentication -----------------------------------------------------------------------------------------
async def test_a_valid_token_gets_a_paged_list(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    status, body, headers = await call(session, sim, "/crm/v2/tenant/1000001/customers", token)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert (body["page"], body["pageSize"], body["hasMore"], body["totalCount"]) == (1, 50, True, None)
    assert [item["id"] for item in body["data"]] == list(range(1, 51))
    assert sim.api_requests == 1


async def test_the_last_page_has_no_more_and_include_total_counts(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    status, body, _ = await call(
        session, sim, "/crm/v2/tenant/1000001/customers?page=3&pageSize=50&includeTotal=true", token
    )
    assert status == 200
    assert (body["hasMore"], body["totalCount"], len(body["data"])) == (False, 120, 20)
    assert body["data"][0] == {"id": 101, "name": "customers 101"}


async def test_a_page_size_above_500_is_a_400_problem(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    status, body, _ = await call(session, sim, "/crm/v2/tenant/1000001/customers?pageSize=501", token)
    assert status == 400 and body["status"] == 400 and "pageSize" in body["errors"]


async def test_an_item_by_id_is_a_single_object_and_huge_ids_are_missing(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    assert (await call(session, sim, "/jpm/v2/tenant/1000001/jobs/42", token))[1] == {"id": 42, "name": "jobs 42"}
    status, body, _ = await call(session, sim, "/jpm/v2/tenant/1000001/jobs/1000001", token)
    assert status == 404 and body["title"] == "Not Found" and body["traceId"]


async def test_a_missing_app_key_is_a_401_titled_application_key(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    for app_key in (None, "ak1.other-app"):
        status, body, _ = await call(session, sim, "/crm/v2/tenant/1000001/customers", token, app_key=app_key)
        assert status == 401 and body["title"].startswith("Application key")
        assert set(body) == {"type", "title", "status", "traceId", "errors", "data"}


async def test_an_unknown_or_missing_token_is_a_plain_401_unauthorized(make_simulator, session):
    sim = await make_simulator()
    for token in (None, "not-a-token", (await token_for(session, sim)) + "x"):
        status, body, headers = await call(session, sim, "/crm/v2/tenant/1000001/customers", token)
        assert (status, body["title"]) == (401, "Unauthorized")
        assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_bare_token_without_bearer_is_accepted(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    assert (await call(session, sim, "/crm/v2/tenant/1000001/customers", token, bare=True))[0] == 200


async def test_a_token_for_another_tenant_is_forbidden(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim, T2)
    status, body, _ = await call(session, sim, "/crm/v2/tenant/1000001/customers", token)
    assert (status, body["title"]) == (403, "Forbidden")


async def test_tokens_expire_by_the_injected_clock(make_simulator, session):
    clock = FakeClock()
    sim = await make_simulator(clock=clock, token_ttl=900)
    token = await token_for(session, sim)
    clock.now += 899.9
    assert (await call(session, sim, "/crm/v2/tenant/1000001/customers", token))[0] == 200
    clock.now += 0.1
    status, body, headers = await call(session, sim, "/crm/v2/tenant/1000001/customers", token)
    assert (status, body["title"]) == (401, "Unauthorized") and "expired" in headers["WWW-Authenticate"]


async def test_expire_tokens_makes_every_issued_token_expired(make_simulator, session):
    sim = await make_simulator(clock=FakeClock())
    token = await token_for(session, sim)
    sim.expire_tokens()
    assert (await call(session, sim, "/crm/v2/tenant/1000001/customers", token))[0] == 401
    fresh = await token_for(session, sim)
    assert (await call(session, sim, "/crm/v2/tenant/1000001/customers", fresh))[0] == 200


async def test_revoking_one_tenant_leaves_the_others_tokens_valid(make_simulator, session):
    sim = await make_simulator()
    t1, t2 = await token_for(session, sim, T1), await token_for(session, sim, T2)
    sim.revoke_tokens("1000001")
    assert (await call(session, sim, "/crm/v2/tenant/1000001/customers", t1))[0] == 401
    assert (await call(session, sim, "/crm/v2/tenant/1000002/customers", t2))[0] == 200
    sim.revoke_tokens()
    assert (await call(session, sim, "/crm/v2/tenant/1000002/customers", t2))[0] == 401


# ---- API answers ------------------------------------------------------------------------------------------------
async def test_write_methods_echo_the_json_body_and_delete_answers_204(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    path = "/jpm/v2/tenant/1000001/jobs"
    status, body, _ = await call(session, sim, path, token, method="POST", json={"a": 1})
    assert (status, body) == (201, {"received": {"a": 1}, "method": "POST"})
    status, body, _ = await call(session, sim, f"{path}/7", token, method="PATCH")
    assert (status, body) == (200, {"received": None, "method": "PATCH"})
    assert (await call(session, sim, f"{path}/7", token, method="DELETE"))[:2] == (204, None)


async def test_echo_reports_the_raw_path_duplicate_headers_and_body_hash(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    raw = "/crm/v2/tenant/1000001/echo/a%2Fb%20c?q=a%20b&q=%2F&plus=+&tilde=%7E"
    body = os.urandom(3 * 1024 * 1024 + 17)
    headers = CIMultiDict(
        [("ST-App-Key", DEMO_APP_KEY), ("Authorization", f"Bearer {token}"), ("X-Dup", "one"), ("X-Dup", "two")]
    )
    url = URL(f"{sim.base_url}{raw}", encoded=True)  # encoded=True: yarl must not requote the path
    async with session.put(url, data=io.BytesIO(body), headers=headers) as resp:
        echo = await resp.json()
    assert resp.status == 200
    assert echo["method"] == "PUT" and echo["path"] == raw
    assert ["X-Dup", "one"] in echo["headers"] and ["X-Dup", "two"] in echo["headers"]
    assert ["Content-Length", str(len(body))] in echo["headers"]
    assert (echo["body_sha256"], echo["body_length"]) == (hashlib.sha256(body).hexdigest(), len(body))


async def test_download_streams_exactly_the_requested_bytes_in_the_pattern(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    status_headers = {"ST-App-Key": DEMO_APP_KEY, "Authorization": f"Bearer {token}"}
    url = f"{sim.base_url}/crm/v2/tenant/1000001/download?bytes=200003&chunk=1000"
    async with session.get(url, headers=status_headers) as resp:
        data = await resp.read()
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/octet-stream"
    assert len(data) == 200003
    assert data == (b"0123456789abcdef" * 12501)[:200003]


async def test_redirect_answers_302_and_setcookie_sets_a_cookie(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    headers = {"ST-App-Key": DEMO_APP_KEY, "Authorization": f"Bearer {token}"}
    async with session.get(
        f"{sim.base_url}/crm/v2/tenant/1000001/redirect", headers=headers, allow_redirects=False
    ) as resp:
        assert resp.status == 302 and resp.headers["Location"].startswith("https://")
    async with session.get(f"{sim.base_url}/crm/v2/tenant/1000001/setcookie", headers=headers) as resp:
        assert resp.status == 200 and "Set-Cookie" in resp.headers


# ---- control API, helpers ---------------------------------------------------------------------------------------
async def test_control_api_reports_stats_and_injects_failures(make_simulator, session):
    sim = await make_simulator()
    token = await token_for(session, sim)
    async with session.post(f"{sim.base_url}/_sim/fail-tokens", json={"status": 500, "times": 1}) as resp:
        assert resp.status == 200
    assert (await post_token(session, sim))[0] == 500
    async with session.post(f"{sim.base_url}/_sim/fail-tokens", json={"status": 502}) as resp:
        assert resp.status == 200
    async with session.post(f"{sim.base_url}/_sim/clear") as resp:
        assert resp.status == 200
    async with session.post(f"{sim.base_url}/_sim/revoke?tenant=1000001") as resp:
        assert resp.status == 200
    assert (await call(session, sim, "/crm/v2/tenant/1000001/customers", token))[0] == 401
    async with session.get(f"{sim.base_url}/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["token_requests"] == 2 and stats["api_requests"] == 1
    assert stats["token_requests_by_client"] == {"cid.demo1": 2}


async def test_a_malformed_fail_tokens_request_is_a_400(make_simulator, session):
    sim = await make_simulator()
    async with session.post(f"{sim.base_url}/_sim/fail-tokens", json={"times": 1}) as resp:
        assert resp.status == 400


async def test_every_simulator_builds_its_own_app_and_stops_cleanly(make_simulator):
    a, b = Simulator(), Simulator()
    assert a.app is not b.app
    sim = await make_simulator()
    assert sim.base_url.startswith("http://127.0.0.1:")
    await sim.stop()
    assert sim.base_url is None


def test_parse_tenant_spec_keeps_colons_in_the_secret():
    assert parse_tenant_spec("123:cid.x:cs1.a:b") == SimTenant("123", "cid.x", "cs1.a:b")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("cs1.only-a-secret", "three parts"),
        ("abc:cid.x:cs1.topsecret", "tenant id must be digits"),
        ("123::cs1.topsecret", "client id is empty"),
        ("123:cid.x:", "client secret is empty"),
    ],
)
def test_parse_tenant_spec_rejects_bad_input_without_naming_the_secret(spec, problem):
    with pytest.raises(ValueError, match="ID:CLIENT_ID:SECRET") as info:
        parse_tenant_spec(spec)
    assert problem in str(info.value)
    assert "topsecret" not in str(info.value) and "only-a-secret" not in str(info.value)


def test_a_secret_never_shows_in_a_tenants_repr():
    assert "cs1.demo-secret-1" not in repr(T1)


async def test_describe_lists_the_urls_app_key_and_demo_credentials(make_simulator):
    sim = await make_simulator()
    text = describe(sim)
    assert sim.auth_url in text and DEMO_APP_KEY in text
    for tenant in DEMO_TENANTS:
        assert tenant.tenant_id in text and tenant.client_id in text and tenant.client_secret in text
