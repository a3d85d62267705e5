"""Configs with clients against the simulator, and the credentials the tests present (distinctive values: a sweep
for them in logs, metrics and answers finds any leak)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

from conftest import T1, T2, basic_auth, sim_config

BILLING = "billing-sync"
BILLING_SECRET = "cl1.BILLING-secret-do-not-print-8c1f0e7a"
BILLING_OLD = "cl1.BILLING-old-secret-do-not-print-02d4"
OPS = "ops.all"
OPS_SECRET = "cl1.OPS-secret-do-not-print-66e1b2c3d4e5f6a7"
# Characters that raw and form-encoded Basic write differently (RFC 6749 section 2.3.1: form-encode, then base64).
ODD = "odd_one"
ODD_SECRET = "cl1.ODD:se cret+with/=&%-do-not-print-4b"
UNCONFIGURED = "99999"  # a tenant id with no credentials here
CLIENT_SECRETS = (BILLING_SECRET, BILLING_OLD, OPS_SECRET, ODD_SECRET)


def clients_config(sim, *, clients: dict[str, Any] | None = None, security: dict[str, Any] | None = None, **kw):
    """billing-sync may use T1 only; ops.all every tenant; odd_one T2 (its secret needs form-encoding)."""
    raw_clients = clients or {
        BILLING: {"secret": {"value": BILLING_SECRET}, "tenants": [T1.tenant_id]},
        OPS: {"secret": {"value": OPS_SECRET}, "tenants": ["*"]},
        ODD: {"secret": {"value": ODD_SECRET}, "tenants": [T2.tenant_id]},
    }
    sections: dict[str, Any] = {"clients": raw_clients, **kw}
    if security is not None:
        sections["security"] = security
    return sim_config(sim, **sections)


def basic(name: str, secret: str, *, form_encoded: bool = False) -> dict[str, str]:
    if form_encoded:
        name, secret = quote_plus(name), quote_plus(secret)
    return basic_auth(name, secret)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def local_token(proxy, name: str, secret: str) -> str:
    """A local token from the proxy's POST /connect/token (client_secret_post)."""
    form = {"grant_type": "client_credentials", "client_id": name, "client_secret": secret}
    async with proxy.session.post(proxy.url + "/connect/token", data=form) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["access_token"]
