"""No client secret, local token, Basic credential, signing key, admin token or real token ever shows up in a log
line, a metric, /tenants, a problem body, a header sent to a caller, or check-config's output (docs/security.md).
A scripted mix of caller traffic touches every path that authenticates, refuses or logs; then every byte the proxy
produced is searched for every distinctive value."""

from __future__ import annotations

import base64

from client_setup import BILLING, BILLING_SECRET, FORM, OPS, OPS_SECRET, basic, bearer, clients_config
from conftest import T1, T2

from st_proxy.cli import main
from st_proxy.server.reload import Reloader

SIGNING_KEY = "sk1.SWEEP-signing-key-0f9e8d7c6b5a49382716"
ADMIN_TOKEN = "at1.SWEEP-admin-token-5e4d3c2b1a"
WRONG_SECRET = "cl1.SWEEP-wrong-guess-a1b2c3d4e5f6"
IDENTITY = {"Accept-Encoding": "identity"}  # the session keeps bodies as sent: ask for them uncompressed


async def test_no_caller_credential_appears_in_logs_metrics_tenants_or_answers(
    simulator, start_proxy, captured_logs, capsys, tmp_path
):
    security = {
        "token_signing_key": {"value": SIGNING_KEY},
        "admin_token": {"value": ADMIN_TOKEN},
        "expose_tenants": True,
        "max_body_bytes": 100,
    }
    config = clients_config(simulator, security=security)
    proxy = await start_proxy(config, prewarm=False)
    session = proxy.session
    produced: list[str] = []  # everything the proxy sent back, but the one token answer that must hold a token

    async def collect(resp) -> None:
        produced.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")

    form = {"grant_type": "client_credentials", "client_id": BILLING, "client_secret": BILLING_SECRET}
    async with session.post(proxy.url + "/connect/token", data=form) as resp:
        local_token = (await resp.json())["access_token"]
    url = f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers"
    basic_value = basic(OPS, OPS_SECRET)["Authorization"]
    attempts = [
        ("GET", url, basic(OPS, OPS_SECRET), None),
        ("GET", url, basic(OPS, OPS_SECRET, form_encoded=True), None),
        ("GET", url, bearer(local_token), None),
        ("GET", url, {"Authorization": local_token}, None),
        ("GET", url.replace(T1.tenant_id, T2.tenant_id), bearer(local_token), None),  # forbidden
        ("GET", url.replace(T1.tenant_id, "424242"), basic(OPS, OPS_SECRET), None),  # unknown tenant
        ("POST", url, basic(OPS, OPS_SECRET), b"x" * 500),  # body too large
        ("GET", url, {"Authorization": bearer(local_token)["Authorization"] + "x"}, None),  # tampered
        ("GET", url, {"Authorization": "Bearer " + local_token.replace("stp1", "stp9")}, None),
        *[("GET", url, basic(BILLING, WRONG_SECRET), None)] * 12,  # unauthorized, then throttled
        (
            "POST",
            proxy.url + "/connect/token",
            {**FORM, **basic(BILLING, WRONG_SECRET)},
            b"grant_type=client_credentials",
        ),
        ("POST", proxy.url + "/connect/token", FORM, f"grant_type=password&client_secret={OPS_SECRET}".encode()),
    ]
    statuses = []
    for method, target, headers, body in attempts:
        async with session.request(method, target, headers=headers, data=body) as resp:
            statuses.append(resp.status)
            await collect(resp)
    assert {200, 401, 403, 413, 429, 400} <= set(statuses)
    for path in ("/tenants", "/metrics"):
        async with session.get(
            proxy.admin_url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}", **IDENTITY}
        ) as resp:
            assert resp.status == 200
            await collect(resp)
        async with session.get(
            proxy.admin_url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}x", **IDENTITY}
        ) as resp:
            assert resp.status == 401
            await collect(resp)

    # A reload, with every secret in play (its log line lists clients and tenants, never a value).
    again = clients_config(simulator, security=security)
    reloader = Reloader(
        proxy.runtime.holder,
        proxy.runtime.metrics,
        tokens=lambda: proxy.runtime.tokens,
        load=lambda: again,
        poll_seconds=0,
    )
    assert await reloader.reload_now()

    # check-config on a file with the same values.
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
app_key: {{env: APP}}
tenants:
  "{T1.tenant_id}": {{client_id: {T1.client_id}, client_secret: {{env: TENANT_SECRET}}}}
clients:
  {BILLING}: {{secret: {{env: BILLING_SECRET}}, tenants: ["{T1.tenant_id}"]}}
  {OPS}: {{secrets: [{{env: OPS_SECRET}}, {{value: "{WRONG_SECRET}"}}], tenants: ["*"]}}
security: {{token_signing_key: {{env: SIGNING}}, admin_token: {{env: ADMIN}}}}
"""
    )
    environ = {
        "APP": "ak1.SWEEP-app-key-77",
        "TENANT_SECRET": T1.client_secret,
        "BILLING_SECRET": BILLING_SECRET,
        "OPS_SECRET": OPS_SECRET,
        "SIGNING": SIGNING_KEY,
        "ADMIN": ADMIN_TOKEN,
    }
    capsys.readouterr()
    assert main(["check-config", "--config", str(path)], environ) == 0
    checked = capsys.readouterr()
    assert f"{BILLING}:" in checked.out

    haystack = {
        "logs": captured_logs(),
        "answers": "\n".join(produced),
        "check-config": checked.out + checked.err,
    }
    needles = {
        "client secret": [BILLING_SECRET, OPS_SECRET, WRONG_SECRET],
        "local token": [local_token, local_token.split(".")[2]],
        "basic credential": [
            basic_value.split(" ")[1],
            base64.b64encode(f"{BILLING}:{WRONG_SECRET}".encode()).decode(),
        ],
        "signing key": [SIGNING_KEY],
        "admin token": [ADMIN_TOKEN],
        "real token": list(simulator.issued_tokens),
    }
    assert simulator.issued_tokens  # requests went through: there were real tokens to leak
    for where, text in haystack.items():
        for what, values in needles.items():
            for value in values:
                assert value not in text, f"{what} found in {where}"
