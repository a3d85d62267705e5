"""POST /connect/token (docs/security.md): RFC 6749 answers, never forwarded, placeholder tokens without clients; local
tokens verify on every replica and after a restart with the same config, and stop at once when their secret is
rotated out or their client removed, also through a reload of the real `st-proxy` process."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import aiohttp
import pytest
import yaml
from client_setup import (
    BILLING,
    BILLING_OLD,
    BILLING_SECRET,
    FORM,
    ODD,
    ODD_SECRET,
    OPS,
    OPS_SECRET,
    basic,
    bearer,
    clients_config,
    local_token,
)
from conftest import T1, T2, sim_config
from multidict import CIMultiDict
from serve_process import ServeProcess, write_config
from test_metrics import Scrape

from st_proxy.config import from_mapping
from st_proxy.devtools.simulator import DEMO_APP_KEY
from st_proxy.inbound import local_tokens
from st_proxy.server.reload import Reloader

SIGNING_KEY = "sk1.SIGNING-key-do-not-print-0123456789abcdef"


def token_url(proxy) -> str:
    return proxy.url + "/connect/token"


def customers(proxy, tenant=T1.tenant_id) -> str:
    return f"{proxy.url}/crm/v2/tenant/{tenant}/customers"


@pytest.fixture
async def proxy(simulator, start_proxy, clock):
    return await start_proxy(clients_config(simulator), prewarm=False, clock=clock)


async def status_with(proxy, token: str, tenant=T1.tenant_id) -> int:
    async with proxy.session.get(customers(proxy, tenant), headers=bearer(token)) as resp:
        return resp.status


# ---- the endpoint -----------------------------------------------------------------------------------------------
async def test_client_secret_post_gets_an_rfc6749_answer_that_is_not_cached(proxy, simulator):
    form = {"grant_type": "client_credentials", "client_id": BILLING, "client_secret": BILLING_SECRET, "scope": "x"}
    async with proxy.session.post(token_url(proxy), data=form) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store" and resp.content_type == "application/json"
        body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 900)
    assert body["access_token"].startswith("stp1.")
    assert simulator.token_requests == 0  # the proxy's own token: ServiceTitan is not asked


@pytest.mark.parametrize("form_encoded", [False, True])
async def test_client_secret_basic_raw_or_form_encoded(proxy, form_encoded):
    headers = basic(ODD, ODD_SECRET, form_encoded=form_encoded)
    async with proxy.session.post(token_url(proxy), data={"grant_type": "client_credentials"}, headers=headers) as r:
        assert r.status == 200
        token = (await r.json())["access_token"]
    assert await status_with(proxy, token, T2.tenant_id) == 200


async def test_the_endpoint_is_never_forwarded_even_with_a_default_tenant(simulator, start_proxy):
    config = clients_config(simulator, routing={"default_tenant": T1.tenant_id})
    proxy = await start_proxy(config, prewarm=False)
    await local_token(proxy, BILLING, BILLING_SECRET)
    async with proxy.session.post(token_url(proxy), data={"grant_type": "client_credentials"}) as resp:
        assert resp.status == 401
    async with proxy.session.get(token_url(proxy)) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
    assert simulator.token_requests == 0 and simulator.api_requests == 0


@pytest.mark.parametrize(
    ("data", "headers", "status", "error"),
    [
        ("grant_type=client_credentials", {}, 400, "invalid_request"),  # not a form content type
        ("client_id=billing-sync", FORM, 400, "invalid_request"),
        ("grant_type=password&client_id=billing-sync", FORM, 400, "unsupported_grant_type"),
        ("grant_type=client_credentials&grant_type=client_credentials", FORM, 400, "invalid_request"),
        (b"grant_type=client_credentials&x=\xff", FORM, 400, "invalid_request"),
        ("grant_type=client_credentials", FORM, 401, "invalid_client"),
        (
            "grant_type=client_credentials&client_id=billing-sync&client_secret=wrong-wrong-wrong",
            FORM,
            401,
            "invalid_client",
        ),
        ("grant_type=client_credentials&client_id=nobody&client_secret=" + BILLING_SECRET, FORM, 401, "invalid_client"),
    ],
)
async def test_errors_follow_rfc6749_section_5_2(proxy, data, headers, status, error):
    async with proxy.session.post(token_url(proxy), data=data, headers=headers) as resp:
        assert resp.status == status
        assert resp.headers["Cache-Control"] == "no-store"
        body = await resp.json()
    assert body["error"] == error and BILLING_SECRET not in json.dumps(body)


async def test_basic_and_post_at_once_are_refused_and_a_failed_basic_gets_a_basic_challenge(proxy):
    both = f"grant_type=client_credentials&client_id={BILLING}&client_secret={BILLING_SECRET}"
    async with proxy.session.post(token_url(proxy), data=both, headers={**FORM, **basic(OPS, OPS_SECRET)}) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    headers = {**FORM, **basic(BILLING, "wrong-wrong-wrong-wrong")}
    async with proxy.session.post(token_url(proxy), data="grant_type=client_credentials", headers=headers) as resp:
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == 'Basic realm="st-proxy"'


async def test_two_authorization_headers_are_refused_as_ambiguous_like_on_the_data_port(proxy):
    headers = CIMultiDict(FORM)
    headers.add("Authorization", basic(BILLING, BILLING_SECRET)["Authorization"])
    headers.add("Authorization", basic(OPS, "wrong-wrong-wrong-wrong")["Authorization"])
    async with proxy.session.post(token_url(proxy), data="grant_type=client_credentials", headers=headers) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"


async def test_wrong_secrets_at_the_endpoint_count_toward_the_throttle(proxy):
    wrong = {"grant_type": "client_credentials", "client_id": BILLING, "client_secret": "x" * 20}
    for _ in range(10):
        async with proxy.session.post(token_url(proxy), data=wrong) as resp:
            assert resp.status == 401
    async with proxy.session.post(token_url(proxy), data=wrong) as resp:
        assert resp.status == 429 and int(resp.headers["Retry-After"]) == 60
        assert resp.headers["X-ST-Proxy-Error"] == "client_throttled"
    async with proxy.session.get(customers(proxy), headers=basic(BILLING, "x" * 20)) as resp:
        assert resp.status == 429  # one throttle per name, on the data port too
    assert await local_token(proxy, BILLING, BILLING_SECRET)


async def test_without_clients_any_client_credentials_request_gets_a_placeholder(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    form = {"grant_type": "client_credentials", "client_id": "anything", "client_secret": "anything"}
    async with proxy.session.post(token_url(proxy), data=form) as resp:
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        token = (await resp.json())["access_token"]
    assert token not in simulator.issued_tokens
    async with proxy.session.get(customers(proxy), headers={"Authorization": token}) as resp:
        assert resp.status == 200  # a library that sends it along works; the proxy sends the tenant's own
    assert simulator.token_requests == 1


# ---- what a token is bound to -----------------------------------------------------------------------------------
async def test_a_token_expires_after_its_ttl(simulator, start_proxy, clock):
    proxy = await start_proxy(
        clients_config(simulator, security={"local_token_ttl_seconds": 60}), prewarm=False, clock=clock
    )
    token = await local_token(proxy, BILLING, BILLING_SECRET)
    assert await status_with(proxy, token) == 200
    clock.advance(61)
    assert await status_with(proxy, token) == 401


async def test_a_token_keeps_its_clients_tenants_and_cannot_be_altered(proxy):
    token = await local_token(proxy, BILLING, BILLING_SECRET)
    assert await status_with(proxy, token, T2.tenant_id) == 403
    prefix, payload, mac = token.split(".")
    claims = base64.urlsafe_b64decode(payload + "==").decode()
    forged_claims = claims.replace(BILLING, OPS, 1)  # claim to be the every-tenant client
    forged = f"{prefix}.{base64.urlsafe_b64encode(forged_claims.encode()).decode().rstrip('=')}.{mac}"
    assert await status_with(proxy, forged) == 401
    longer = claims.split(":")
    longer[2] = str(int(longer[2]) + 10**6)
    extended = f"{prefix}.{base64.urlsafe_b64encode(':'.join(longer).encode()).decode().rstrip('=')}.{mac}"
    assert await status_with(proxy, extended) == 401
    assert BILLING_SECRET not in claims


@pytest.mark.parametrize("signing", [None, SIGNING_KEY])
async def test_a_token_verifies_on_another_replica_with_the_same_config(simulator, start_proxy, signing):
    security = {"token_signing_key": {"value": signing}} if signing else None
    one = await start_proxy(clients_config(simulator, security=security), prewarm=False)
    two = await start_proxy(clients_config(simulator, security=security), prewarm=False)
    token = await local_token(one, BILLING, BILLING_SECRET)
    assert await status_with(two, token) == 200
    if signing:  # another key: no replica of that config accepts it
        other = await start_proxy(
            clients_config(simulator, security={"token_signing_key": {"value": SIGNING_KEY[::-1]}}), prewarm=False
        )
        assert await status_with(other, token) == 401


@pytest.mark.parametrize("signing", [None, SIGNING_KEY])
async def test_dropping_the_secret_that_obtained_a_token_ends_it_at_once_the_other_secrets_tokens_live_on(
    simulator, start_proxy, signing
):
    security = {"token_signing_key": {"value": signing}} if signing else None
    rotating = {
        BILLING: {"secrets": [{"value": BILLING_SECRET}, {"value": BILLING_OLD}], "tenants": [T1.tenant_id]},
        OPS: {"secret": {"value": OPS_SECRET}, "tenants": ["*"]},
    }
    proxy = await start_proxy(clients_config(simulator, clients=rotating, security=security), prewarm=False)
    new_token = await local_token(proxy, BILLING, BILLING_SECRET)
    old_token = await local_token(proxy, BILLING, BILLING_OLD)
    assert await status_with(proxy, old_token) == 200
    rotated = dict(rotating, **{BILLING: {"secret": {"value": BILLING_SECRET}, "tenants": [T1.tenant_id]}})
    proxy.runtime.holder.swap(clients_config(simulator, clients=rotated, security=security))
    assert await status_with(proxy, old_token) == 401
    assert await status_with(proxy, new_token) == 200
    proxy.runtime.holder.swap(clients_config(simulator, clients={OPS: rotating[OPS]}, security=security))
    assert await status_with(proxy, new_token) == 401  # the client is gone


def test_issue_and_verify_directly():
    config = from_mapping(
        {
            "app_key": "k" * 10,
            "tenants": {"1": {"client_id": "c", "client_secret": "s" * 10}},
            "clients": {"a": {"secret": "a" * 32, "tenants": ["*"]}, "b": {"secret": "b" * 32, "tenants": ["*"]}},
        },
        {},
    )
    va = local_tokens.verifiers(config.clients["a"], None)
    vb = local_tokens.verifiers(config.clients["b"], None)
    token = local_tokens.issue("a", va[0], expires_at=1000)
    claims = local_tokens.parse(token)
    assert claims is not None and claims.client_name == "a"
    assert local_tokens.verify(claims, va, now=999) and not local_tokens.verify(claims, va, now=1000)
    assert not local_tokens.verify(claims, vb, now=0)
    assert local_tokens.issue("a", va[0], expires_at=1000) != token  # a nonce: never the same token twice
    for junk in ("", "stp1", "stp1..", "stp1.!!.!!", "stp1.YQ.YQ", token + "x", token.replace("stp1", "stp2")):
        parsed = local_tokens.parse(junk)
        assert parsed is None or not local_tokens.verify(parsed, va, now=0)


# ---- the real process: clients reload like tenants --------------------------------------------------------------
async def test_clients_added_rotated_and_removed_by_a_reload_of_the_real_process(tmp_path, simulator):
    secret_file = tmp_path / "billing.secret"
    secret_file.write_text(BILLING_SECRET + "\n")
    clients = {BILLING: {"secret": {"file": str(secret_file)}, "tenants": [T1.tenant_id]}}
    path = write_config(
        tmp_path,
        auth_url=simulator.auth_url,
        api_url=simulator.base_url,
        tenants=[T1, T2],
        app_key=DEMO_APP_KEY,
        clients=clients,
    )
    child = await ServeProcess.start(path)
    try:
        async with aiohttp.ClientSession() as session:

            async def get(headers) -> int:
                async with session.get(f"{child.url}/crm/v2/tenant/{T1.tenant_id}/customers", headers=headers) as r:
                    return r.status

            async def token(name, secret) -> str:
                form = {"grant_type": "client_credentials", "client_id": name, "client_secret": secret}
                async with session.post(child.url + "/connect/token", data=form) as r:
                    assert r.status == 200
                    return (await r.json())["access_token"]

            old = await token(BILLING, BILLING_SECRET)
            assert await get(bearer(old)) == 200
            assert await get(basic(OPS, OPS_SECRET)) == 401

            # Add a client and rotate billing-sync's secret, in one edit: no restart.
            secret_file.write_text(BILLING_OLD + "\n")
            raw = yaml.safe_load(path.read_text())
            raw["clients"][OPS] = {"secret": {"value": OPS_SECRET}, "tenants": ["*"]}
            _replace(path, yaml.safe_dump(raw))
            await child.wait_event("config_reloaded")
            assert await get(basic(OPS, OPS_SECRET)) == 200
            assert await get(bearer(old)) == 401  # its secret is gone
            assert await get(basic(BILLING, BILLING_OLD)) == 200

            async def client_series() -> set[str]:
                async with session.get(child.admin_url + "/metrics") as r:
                    return {s["client"] for s in Scrape(await r.text()).series("st_proxy_client_auth_total")}

            assert await client_series() == {BILLING, OPS, "none"}  # the added client's series exist at once

            # Removing every client of a loopback proxy is allowed: callers are then not authenticated.
            raw.pop("clients")
            _replace(path, yaml.safe_dump(raw))
            await child.wait_event("config_reloaded", count=2)
            assert await get({}) == 200
            assert await client_series() == {"none"}  # removed clients' series are gone
    finally:
        await child.close()
    for secret in (BILLING_SECRET, BILLING_OLD, OPS_SECRET, old):
        assert secret not in child.output()


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic, as an editor or a ConfigMap update does


async def test_a_reload_that_would_leave_the_bound_port_open_fails_and_the_old_config_stays(simulator, start_proxy):
    bound_open = clients_config(simulator, listen="0.0.0.0:8080")  # as if bound beyond loopback, never bound here
    proxy = await start_proxy(bound_open, prewarm=False)
    # The new file says loopback and has no clients: judged against the listener that is bound, it must fail.
    no_clients = sim_config(simulator, listen="127.0.0.1:8080")
    reloader = Reloader(
        proxy.runtime.holder, proxy.runtime.metrics, tokens=lambda: None, load=lambda: no_clients, poll_seconds=0
    )
    assert await reloader.reload_now() is False
    assert proxy.runtime.holder.current is bound_open
    scrape = Scrape(await proxy.metrics_text())
    assert scrape.value("st_proxy_config_reloads_total", result="failure") == 1
    async with proxy.session.get(customers(proxy)) as resp:
        assert resp.status == 401
