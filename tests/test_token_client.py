"""One client-credentials request (RFC 6749 section 4.4): what is sent, how answers are read, how failures are classed.

Against the real simulator where it can answer, and a small loopback token endpoint of our own for the answers the
simulator never gives (other expires_in shapes, garbage, oversized bodies)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable

import pytest
from aiohttp import web
from conftest import T1, FakeClock, sim_config

from st_proxy.config import Tenant
from st_proxy.devtools.simulator import SimTenant
from st_proxy.upstream.token_client import (
    DEFAULT_LIFETIME,
    TokenClient,
    TokenRequestFailed,
    basic_credentials,
    parse_retry_after,
    parse_token_answer,
)

AWKWARD_SECRET = "cs1.a:b+c%2Fd e&f=g"  # ':' '+' '%' ' ' '&' '=': every character form encoding must escape


def jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


@pytest.fixture
async def token_endpoint(fake_upstream):
    """``make(handler)``: a loopback token endpoint answering with ``handler(request)``; returns a tenant using it."""

    async def make(answer: Callable[[web.Request], web.StreamResponse]) -> Tenant:
        async def handler(request: web.Request) -> web.StreamResponse:
            await request.read()
            return answer(request)

        app = web.Application()
        app.router.add_post("/connect/token", handler)
        return sim_config(None, auth_url=await fake_upstream(app) + "/connect/token").tenants[T1.tenant_id]

    return make


async def fetch(session, tenant: Tenant, clock: FakeClock, **kwargs):
    return await TokenClient(session, clock=clock, **kwargs).fetch(tenant)


# -- what is sent ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("client_auth", ["client_secret_post", "client_secret_basic"])
async def test_a_secret_with_colon_plus_percent_and_spaces_works_with_both_client_auth_methods(
    make_simulator, session, clock, client_auth
):
    awkward = SimTenant(T1.tenant_id, "cid.odd:id+1", AWKWARD_SECRET)
    sim = await make_simulator(tenants=[awkward])
    tenant = sim_config(sim, tenants=[awkward]).tenants[T1.tenant_id]
    token = await fetch(session, tenant, clock, client_auth=client_auth)
    assert token.access_token == sim.issued_tokens[0]
    assert token.expires_at - token.issued_at == 900 and token.issued_at == clock()


def test_client_secret_basic_form_encodes_each_part_before_base64_per_rfc_6749_2_3_1():
    header = basic_credentials("cid.odd:id", AWKWARD_SECRET)
    decoded = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert decoded == "cid.odd%3Aid:cs1.a%3Ab%2Bc%252Fd+e%26f%3Dg"


async def test_the_request_is_a_form_post_with_grant_type_and_no_scope_unless_configured(fake_upstream, session, clock):
    seen: list[tuple[str, dict, str | None]] = []

    async def capture(request: web.Request) -> web.Response:
        form = await request.post()
        seen.append((request.content_type, dict(form), request.headers.get("Authorization")))
        return web.json_response({"access_token": "t", "expires_in": 60})

    app = web.Application()
    app.router.add_post("/connect/token", capture)
    tenant = sim_config(None, auth_url=await fake_upstream(app) + "/connect/token").tenants[T1.tenant_id]
    await fetch(session, tenant, clock)
    await fetch(session, tenant, clock, scope="tn.crm.customers:r")
    await fetch(session, tenant, clock, client_auth="client_secret_basic")
    assert seen[0] == (
        "application/x-www-form-urlencoded",
        {"grant_type": "client_credentials", "client_id": T1.client_id, "client_secret": T1.client_secret},
        None,
    )
    assert seen[1][1]["scope"] == "tn.crm.customers:r"
    assert seen[2][1] == {"grant_type": "client_credentials"} and seen[2][2].startswith("Basic ")


# -- reading answers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, lifetime",
    [
        ({"access_token": "t", "expires_in": 900}, 900),
        ({"access_token": "t", "expires_in": 6.5}, 6.5),
        ({"access_token": "t", "expires_in": "900"}, 900),
        ({"access_token": "t", "expires_in": " 120 "}, 120),
        ({"access_token": "t"}, DEFAULT_LIFETIME),
        (
            {
                "access_token": "t",
                "expires_in": 300,
                "token_type": "Bearer",
                "scope": "x",
                "ext_expires_in": 9,
                "n": {},
            },
            300,
        ),
    ],
    ids=["number", "float", "string", "padded-string", "missing", "extra-fields"],
)
async def test_expires_in_is_read_as_a_number_or_a_string_and_defaults_to_900_seconds(
    token_endpoint, session, clock, answer, lifetime
):
    tenant = await token_endpoint(lambda request: web.json_response(answer))
    token = await fetch(session, tenant, clock)
    assert token.access_token == "t" and token.lifetime == lifetime


async def test_a_jwt_without_expires_in_lives_until_its_exp_claim(token_endpoint, session, clock):
    access = jwt({"exp": int(clock()) + 1234, "client_id": T1.client_id})
    tenant = await token_endpoint(lambda request: web.json_response({"access_token": access}))
    token = await fetch(session, tenant, clock)
    assert token.expires_at == int(clock()) + 1234


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"expires_in": 900}',
        b'{"access_token": "", "expires_in": 900}',
        b'{"access_token": "t", "expires_in": "soon"}',
        b'{"access_token": "t", "expires_in": true}',
        b'{"access_token": "t", "expires_in": [900]}',
        b'{"access_token": "t", "expires_in": 0}',
        b'{"access_token": "t", "expires_in": "-5"}',
        b'{"access_token": "t", "expires_in": "nan"}',
        b'{"access_token": "t", "expires_in": "inf"}',
        b'{"access_token": "t\\r\\nX-Injected: 1", "expires_in": 900}',
    ],
    ids=[
        "not-json",
        "not-object",
        "no-token",
        "empty-token",
        "word",
        "bool",
        "list",
        "zero",
        "negative",
        "nan",
        "inf",
        "header-injection",
    ],
)
async def test_garbage_answers_are_an_invalid_response_transient_failure(token_endpoint, session, clock, body):
    tenant = await token_endpoint(lambda request: web.Response(body=body, content_type="application/json"))
    with pytest.raises(TokenRequestFailed) as failed:
        await fetch(session, tenant, clock)
    assert failed.value.code == "invalid_response" and not failed.value.rejected


async def test_an_oversized_answer_is_an_invalid_response(token_endpoint, session, clock):
    tenant = await token_endpoint(lambda request: web.Response(body=b"{" + b" " * (2 << 20) + b"}"))
    with pytest.raises(TokenRequestFailed) as failed:
        await fetch(session, tenant, clock)
    assert failed.value.code == "invalid_response"


# -- classifying failures ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status, body, code, rejected",
    [
        (400, {"error": "invalid_client", "error_description": "bad secret"}, "invalid_client", True),
        (401, {"error": "unauthorized_client"}, "unauthorized_client", True),
        (400, {"error": "invalid_grant"}, "invalid_grant", True),
        (400, {"error": "invalid_request"}, "invalid_request", True),
        (401, None, "http_401", True),
        (500, None, "http_500", False),
        (502, "<html>bad gateway</html>", "http_502", False),
        (503, {"error": "invalid_client"}, "invalid_client", False),  # 5xx is the endpoint's trouble, whatever it says
        (429, {"error": "slow_down"}, "slow_down", False),
        (404, None, "http_404", False),
        (400, {"error": "bad\ncode"}, "http_400", True),
    ],
    ids=[
        "invalid_client",
        "unauthorized_client",
        "invalid_grant",
        "invalid_request",
        "bare-401",
        "500",
        "502-html",
        "503-with-code",
        "429",
        "404",
        "unsafe-code",
    ],
)
async def test_token_endpoint_errors_are_classified_as_rejected_or_transient(
    simulator, session, clock, status, body, code, rejected
):
    simulator.fail_tokens(status, body)
    with pytest.raises(TokenRequestFailed) as failed:
        await fetch(session, sim_config(simulator).tenants[T1.tenant_id], clock)
    assert (failed.value.code, failed.value.rejected) == (code, rejected)


async def test_a_wrong_secret_at_the_simulator_is_rejected_with_invalid_client(simulator, session, clock):
    tenant = sim_config(simulator, tenants=[SimTenant(T1.tenant_id, T1.client_id, "cs1.wrong")]).tenants[T1.tenant_id]
    with pytest.raises(TokenRequestFailed) as failed:
        await fetch(session, tenant, clock)
    assert (failed.value.code, failed.value.rejected) == ("invalid_client", True)
    assert "cs1.wrong" not in str(failed.value)


async def test_a_429_carries_its_retry_after_in_seconds(simulator, session, clock):
    simulator.fail_tokens(429, headers={"Retry-After": "17"})
    with pytest.raises(TokenRequestFailed) as failed:
        await fetch(session, sim_config(simulator).tenants[T1.tenant_id], clock)
    assert failed.value.retry_after == 17 and not failed.value.rejected


def test_retry_after_is_read_as_seconds_or_an_http_date():
    now = 1_800_000_000.0
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:10 GMT", 1_800_000_000.0) == 10
    assert parse_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", now) == 0  # in the past
    assert parse_retry_after("²", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_an_unreachable_endpoint_is_a_transient_connect_error(session, clock):
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tenant = sim_config(None, auth_url=f"http://127.0.0.1:{port}/connect/token").tenants[T1.tenant_id]
    with pytest.raises(TokenRequestFailed) as failed:
        await fetch(session, tenant, clock)
    assert (failed.value.code, failed.value.rejected) == ("connect_error", False)


async def test_an_endpoint_that_echoes_the_secret_back_does_not_put_it_in_the_error(token_endpoint, session, clock):
    def echo_form(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": T1.client_secret, "error_description": f"got {T1.client_secret}"}, status=400
        )

    tenant = await token_endpoint(echo_form)
    with pytest.raises(TokenRequestFailed) as failed:
        await fetch(session, tenant, clock)
    assert T1.client_secret not in str(failed.value)
    assert T1.client_secret not in failed.value.code + failed.value.description


def test_a_token_repr_never_shows_the_access_token():
    token = parse_token_answer(b'{"access_token": "very-secret-token", "expires_in": 60}', 0)
    assert "very-secret-token" not in repr(token) and "very-secret-token" not in str(token)
