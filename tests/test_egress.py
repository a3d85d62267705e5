"""HTTPS_PROXY / HTTP_PROXY / NO_PROXY for token and API calls, resolved once per base URL."""

from __future__ import annotations

import base64

from aiohttp import web
from conftest import T1, sim_config
from yarl import URL

from st_proxy.upstream.egress import DIRECT, EgressProxies


def test_a_proxy_from_the_environment_is_used_for_its_scheme():
    egress = EgressProxies({"HTTPS_PROXY": "user:p%40ss@127.0.0.1:3128"})
    assert str(egress("https://api.servicetitan.io")) == "http://user:p%40ss@127.0.0.1:3128"


def test_no_proxy_hosts_and_domains_go_direct():
    egress = EgressProxies({"HTTPS_PROXY": "http://127.0.0.1:3128", "NO_PROXY": "localhost,.servicetitan.io"})
    assert egress("https://auth.servicetitan.io/connect/token") == DIRECT
    assert egress("https://api.example.com") is not None


def test_lower_case_variables_win_and_schemes_are_kept_apart():
    egress = EgressProxies({"HTTP_PROXY": "http://127.0.0.1:1", "http_proxy": "http://127.0.0.1:2"})
    assert str(egress("http://api.example.com")) == "http://127.0.0.1:2"
    assert egress("https://api.example.com") == DIRECT


def test_without_proxy_variables_every_call_goes_direct():
    assert EgressProxies({})("https://api.servicetitan.io") == DIRECT


async def test_token_and_api_calls_travel_through_the_configured_forward_proxy(fake_upstream, start_proxy):
    """A forward proxy on loopback sees absolute-form targets for a host that is never resolved by the proxy itself."""
    seen: list[tuple[str, str, str | None, str | None]] = []

    async def forward_proxy(request: web.Request) -> web.Response:
        seen.append(
            (
                request.method,
                request.raw_path,
                request.headers.get("Proxy-Authorization"),
                request.headers.get("Authorization"),
            )
        )
        if request.raw_path.endswith("/connect/token"):
            return web.json_response({"access_token": "tok-via-proxy", "expires_in": 900})
        return web.json_response({"ok": True})

    fake = URL(await fake_upstream(forward_proxy))
    config = sim_config(api_url="http://api.st.test", auth_url="http://auth.st.test/connect/token")
    proxy = await start_proxy(
        config, prewarm=False, environ={"HTTP_PROXY": f"http://agent:s3cret@127.0.0.1:{fake.port}"}
    )

    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers?page=2") as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}

    expected_auth = "Basic " + base64.b64encode(b"agent:s3cret").decode()
    assert seen == [
        ("POST", "http://auth.st.test/connect/token", expected_auth, None),
        (
            "GET",
            f"http://api.st.test/crm/v2/tenant/{T1.tenant_id}/customers?page=2",
            expected_auth,
            "Bearer tok-via-proxy",
        ),
    ]
