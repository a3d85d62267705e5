"""No client secret, app key or access token ever shows up in a log line, a metric, an error body or a header sent to
a caller (docs/operations.md, "Logs"). A scripted mix of traffic touches every path that logs or answers
an error; then every byte the proxy produced is searched for every secret it held and every token it was issued."""

from __future__ import annotations

import socket

import pytest

from st_proxy.config import from_mapping
from st_proxy.devtools.simulator import SimTenant

APP_KEY = "ak1.LEAKCHECK-appkey-7a9e31"
OTHER_APP_KEY = "ak1.LEAKCHECK-override-55e1c0"  # a per-tenant override the simulator does not know: upstream 401
GOOD = SimTenant("3000001", "cid.leak-good", "cs1.LEAKCHECK-good-6d2f0c")
REJECTED = SimTenant("3000002", "cid.leak-rejected", "cs1.LEAKCHECK-right-91ae4b")
WRONG_SECRET = "cs1.LEAKCHECK-wrong-0c7d13"
WRONG_KEY = SimTenant("3000003", "cid.leak-key", "cs1.LEAKCHECK-key-3b8d70")
DOWN = SimTenant("3000004", "cid.leak-down", "cs1.LEAKCHECK-down-e4a1f9")
CALLER_TOKEN = "LEAKCHECK-caller-own-bearer-2c6b"


@pytest.fixture
def dead_port():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def tenant(t: SimTenant, environment: str, secret: str | None = None, app_key: str | None = None) -> dict:
    spec = {"environment": environment, "client_id": t.client_id, "client_secret": {"value": secret or t.client_secret}}
    if app_key:
        spec["app_key"] = {"value": app_key}
    return spec


async def test_no_secret_or_token_appears_in_logs_metrics_or_answers(
    make_simulator, start_proxy, captured_logs, dead_port
):
    sim = await make_simulator(tenants=(GOOD, REJECTED, WRONG_KEY, DOWN), app_keys=(APP_KEY,))
    config = from_mapping(
        {
            "app_key": {"value": APP_KEY},
            "environments": {
                "sim": {"auth_url": sim.auth_url, "api_url": sim.base_url},
                "down": {"auth_url": sim.auth_url, "api_url": f"http://127.0.0.1:{dead_port}"},
            },
            "tenants": {
                GOOD.tenant_id: tenant(GOOD, "sim"),
                REJECTED.tenant_id: tenant(REJECTED, "sim", secret=WRONG_SECRET),
                WRONG_KEY.tenant_id: tenant(WRONG_KEY, "sim", app_key=OTHER_APP_KEY),
                DOWN.tenant_id: tenant(DOWN, "down"),
            },
        },
        {},
    )
    proxy = await start_proxy(config)
    answers: list[str] = []

    async def call(method: str, path: str, *expect: int, **kwargs) -> None:
        async with proxy.session.request(method, proxy.url + path, **kwargs) as resp:
            answers.append(f"{resp.status} {resp.reason}\n{dict(resp.headers)!r}\n{await resp.text()}")
            assert resp.status in expect, answers[-1]

    good = f"/crm/v2/tenant/{GOOD.tenant_id}"
    await call("GET", f"{good}/customers", 200, headers={"Authorization": f"Bearer {CALLER_TOKEN}"})
    await call("POST", f"{good}/notes", 201, json={"text": "hello"}, headers={"ST-App-Key": "ak1.caller-sent"})
    sim.revoke_tokens(GOOD.tenant_id)  # upstream 401, then a new token and a replay
    await call("GET", f"{good}/customers", 200)
    await call("GET", f"{good}/setcookie", 200)
    await call("GET", f"/crm/v2/tenant/{REJECTED.tenant_id}/customers", 502)
    await call("GET", f"/crm/v2/tenant/{WRONG_KEY.tenant_id}/customers", 401)
    await call("GET", f"/crm/v2/tenant/{DOWN.tenant_id}/customers", 502)
    await call("GET", "/crm/v2/tenant/999/customers", 403)
    await call("GET", f"{good}/customers", 400, headers={"X-Tenant-ID": DOWN.tenant_id})
    await call("GET", "/crm/v2/customers", 400, headers={"X-Tenant-ID": "not-a-tenant"})
    sim.fail_tokens(500, {"error": "server_error", "error_description": f"echoing {WRONG_SECRET}"})
    sim.revoke_tokens(GOOD.tenant_id)
    await call("GET", f"{good}/customers", 401, 503)  # upstream 401, and no new token to be had

    for admin in ("/tenants", "/metrics"):
        # identity: the test session does not decompress, and /metrics compresses when asked to
        async with proxy.session.get(proxy.admin_url + admin, headers={"Accept-Encoding": "identity"}) as resp:
            answers.append(await resp.text())
    assert "st_proxy_requests_total" in answers[-1]
    produced = "\n".join([captured_logs(), *answers])

    assert len(sim.issued_tokens) >= 4  # GOOD twice, WRONG_KEY, DOWN: there were tokens to leak
    assert "token_rejected" in produced and "upstream_unreachable" in produced  # the error paths did run
    secrets = [
        APP_KEY,
        OTHER_APP_KEY,
        WRONG_SECRET,
        CALLER_TOKEN,
        *(t.client_secret for t in (GOOD, REJECTED, WRONG_KEY, DOWN)),
        *sim.issued_tokens,
    ]
    for secret in secrets:
        assert secret not in produced, f"a secret leaked: {secret[:12]}..."
    # A JWT's signature alone is secret enough: no fragment of any token either.
    for token in sim.issued_tokens:
        assert token.rsplit(".", 1)[1] not in produced
