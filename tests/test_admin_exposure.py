"""The admin port's exposure (docs/security.md): /tenants hidden on a non-loopback admin_listen unless
security.expose_tenants says otherwise; security.admin_token protects /metrics and /tenants; probes always answer."""

from __future__ import annotations

import pytest
import yaml
from conftest import sim_config
from test_deploy_observability import PROMETHEUS_DIR
from test_prometheus_server import prometheus  # noqa: F401 (fixture)

ADMIN_TOKEN = "at1.ADMIN-token-do-not-print-55aa66bb"


async def status(proxy, path: str, headers: dict[str, str] | None = None) -> int:
    async with proxy.session.get(proxy.admin_url + path, headers=headers or {}) as resp:
        await resp.read()
        return resp.status


@pytest.mark.parametrize(
    ("admin_listen", "expose", "expected"),
    [
        ("127.0.0.1:9090", None, 200),
        ("0.0.0.0:9090", None, 404),
        ("10.0.0.7:9090", "auto", 404),
        ("0.0.0.0:9090", True, 200),
        ("127.0.0.1:9090", False, 404),
    ],
)
async def test_tenants_is_shown_only_where_the_setting_allows(simulator, start_proxy, admin_listen, expose, expected):
    security = {} if expose is None else {"expose_tenants": expose}
    proxy = await start_proxy(sim_config(simulator, admin_listen=admin_listen, security=security), prewarm=False)
    assert await status(proxy, "/tenants") == expected
    assert await status(proxy, "/metrics") == 200
    assert await status(proxy, "/healthz") == 200


async def test_the_admin_token_guards_metrics_and_tenants_but_not_the_probes(simulator, start_proxy):
    config = sim_config(simulator, security={"admin_token": {"value": ADMIN_TOKEN}})
    proxy = await start_proxy(config, prewarm=False)
    for path in ("/metrics", "/tenants"):
        assert await status(proxy, path) == 401
        assert await status(proxy, path, {"Authorization": "Bearer wrong"}) == 401
        assert await status(proxy, path, {"Authorization": f"Basic {ADMIN_TOKEN}"}) == 401
        assert await status(proxy, path, {"Authorization": f"Bearer {ADMIN_TOKEN}"}) == 200
    assert await status(proxy, "/healthz") == 200
    async with proxy.session.get(proxy.admin_url + "/readyz") as resp:
        assert resp.status in (200, 503)  # answers either way, without the token
    async with proxy.session.get(proxy.admin_url + "/metrics") as resp:
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="st-proxy-admin"'
        assert ADMIN_TOKEN not in await resp.text()


async def test_a_real_prometheus_with_the_examples_authorization_scrapes_a_token_protected_admin_port(
    simulator, start_proxy, prometheus, tmp_path
):
    [job] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    token_file = tmp_path / "st-proxy-admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    authorization = {**job["authorization"], "credentials_file": str(token_file)}
    proxy = await start_proxy(sim_config(simulator, security={"admin_token": {"value": ADMIN_TOKEN}}), prewarm=False)
    prom = await prometheus(proxy.admin_url.removeprefix("http://"), authorization=authorization)

    async def scraped() -> bool:
        result = await prom.query('up{job="st-proxy"}')
        return bool(result) and result[0]["value"][1] == "1" and bool(await prom.query("st_proxy_build_info"))

    await prom.wait_for("a successful scrape with the admin token", scraped)


async def test_the_proxys_own_answers_say_server_st_proxy_without_versions_upstream_answers_pass_unchanged(
    simulator, start_proxy
):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    async with proxy.session.get(proxy.url + "/no/tenant") as resp:  # the proxy's own problem answer
        assert resp.status == 400 and resp.headers["Server"] == "st-proxy"
    async with proxy.session.post(proxy.url + "/connect/token", data={"grant_type": "client_credentials"}) as resp:
        assert resp.headers["Server"] == "st-proxy"
    async with proxy.session.get(proxy.admin_url + "/healthz") as resp:
        assert resp.headers["Server"] == "st-proxy"
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/1000001/customers") as resp:
        assert resp.status == 200
        # The simulator is an aiohttp server too: its own Server header arrives as it sent it.
        assert resp.headers["Server"].startswith("Python/")
