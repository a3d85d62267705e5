"""The metrics of docs/operations.md: names, types, labels, bounded label values, and exact values after traffic."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import sim_config
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from st_proxy import __version__
from st_proxy.config import from_mapping
from st_proxy.devtools.simulator import DEMO_APP_KEY, SimTenant
from st_proxy.ops.metrics import METHODS, REQUEST_BUCKETS, TOKEN_BUCKETS, Metrics

OK, REJECTED, REFUSED, RESET, SILENT = "2000001", "2000002", "2000003", "2000004", "2000005"
TENANTS = (OK, REJECTED, REFUSED, RESET, SILENT)
TTL = 900

# docs/operations.md, "Metrics": family name (as the text parser names it) -> (type, label names)
DESIGN = {
    "st_proxy_requests": ("counter", {"tenant", "method", "code"}),
    "st_proxy_request_duration_seconds": ("histogram", {"tenant"}),
    "st_proxy_upstream_errors": ("counter", {"tenant", "kind"}),
    "st_proxy_token_fetches": ("counter", {"tenant", "outcome"}),
    "st_proxy_token_fetch_duration_seconds": ("histogram", {"tenant"}),
    "st_proxy_token_expires_in_seconds": ("gauge", {"tenant"}),
    "st_proxy_token_replays": ("counter", {"tenant"}),
    "st_proxy_in_flight_requests": ("gauge", set()),
    "st_proxy_config_reloads": ("counter", {"result"}),
    "st_proxy_build_info": ("gauge", {"version"}),
    "st_proxy_client_auth": ("counter", {"client", "result"}),
    "st_proxy_local_tokens_issued": ("counter", {"client"}),
}


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def label_values(self, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if label in s.labels}

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


async def scrape_text(proxy, **headers: str) -> str:
    """GET /metrics as text. Identity encoding: the fixture's session does not decompress, and the handler
    compresses for a client that accepts it (Prometheus asks for gzip)."""
    async with proxy.session.get(proxy.admin_url + "/metrics", headers={"Accept-Encoding": "identity", **headers}) as r:
        assert r.status == 200
        return await r.text()


async def settled(proxy) -> None:
    """Wait (bounded) until no request is in flight: the access line and the request metrics are written in the
    handler's last step, which can run just after the caller has read the whole answer."""
    for _ in range(500):
        if proxy.registry.get_sample_value("st_proxy_in_flight_requests") == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("requests still in flight after 5 s")


@dataclass
class BrokenUpstreams:
    refused: str  # nothing listens: connect error
    reset: str  # accepts, then closes without answering
    silent: str  # accepts, reads, never answers: read timeout


@pytest.fixture
async def broken_upstreams() -> AsyncIterator[BrokenUpstreams]:
    writers: list[asyncio.StreamWriter] = []

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    reset = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused_port = s.getsockname()[1]

    def url(server: asyncio.Server) -> str:
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield BrokenUpstreams(f"http://127.0.0.1:{refused_port}", url(reset), url(silent))
    for writer in writers:
        writer.close()
    for server in (reset, silent):
        server.close()
        await server.wait_closed()


def mixed_config(sim, broken: BrokenUpstreams, **overrides: Any):
    """Five tenants: one healthy, one whose secret the token endpoint refuses, three on broken API hosts."""

    def env(api_url: str) -> dict[str, str]:
        return {"auth_url": sim.auth_url, "api_url": api_url}

    secret = {t: f"cs-{t}" for t in TENANTS}
    secret[REJECTED] = "cs-not-what-the-simulator-knows"
    raw = {
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {
            "sim": env(sim.base_url),
            "refused": env(broken.refused),
            "reset": env(broken.reset),
            "silent": env(broken.silent),
        },
        "tenants": {
            t: {"environment": e, "client_id": f"cid.{t}", "client_secret": {"value": secret[t]}}
            for t, e in ((OK, "sim"), (REJECTED, "sim"), (REFUSED, "refused"), (RESET, "reset"), (SILENT, "silent"))
        },
        # A short read timeout so the silent host times out in a fraction of a second.
        "upstream": {"read_timeout_seconds": 0.3},
    }
    raw.update(overrides)
    return from_mapping(raw, {})


@pytest.fixture
async def mixed(make_simulator, broken_upstreams, start_proxy, clock):
    sim = await make_simulator(tenants=[SimTenant(t, f"cid.{t}", f"cs-{t}") for t in TENANTS], token_ttl=TTL)
    config = mixed_config(sim, broken_upstreams)
    proxy = await start_proxy(config, clock=clock)
    for tenant in config.tenants.values():  # prewarm: every tenant's first token attempt
        await proxy.runtime.tokens.entry(tenant).attempted.wait()
    return sim, proxy


async def get(proxy, path: str, method: str = "GET", **kwargs: Any) -> int:
    async with proxy.session.request(method, proxy.url + path, **kwargs) as resp:
        await resp.read()
        return resp.status


def api(tenant: str, rest: str = "customers") -> str:
    return f"/crm/v2/tenant/{tenant}/{rest}"


# -- the shape ---------------------------------------------------------------------------------------------------


async def test_every_design_metric_is_exposed_with_its_type_and_labels_and_nothing_else(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    scrape = Scrape(await scrape_text(proxy))
    shapes = {}
    for name, family in scrape.families.items():
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        shapes[name] = (family.type, labels)
    # Before any request the requests counter has no series (method and code appear with traffic), so its labels
    # are checked after one request.
    assert shapes.pop("st_proxy_requests") == ("counter", set())
    assert shapes == {k: v for k, v in DESIGN.items() if k != "st_proxy_requests"}
    await get(proxy, "/crm/v2/tenant/1000001/customers")
    scrape = Scrape(await scrape_text(proxy))
    assert {k for s in scrape.families["st_proxy_requests"].samples for k in s.labels} == {"tenant", "method", "code"}


async def test_histograms_use_buckets_from_1ms_to_120s_for_requests_and_5ms_to_30s_for_token_fetches():
    metrics = Metrics(CollectorRegistry())
    metrics.set_tenants(["1"])
    scrape = Scrape(_exposed(metrics))
    req = [float(s.labels["le"]) for s in scrape.samples if s.name == "st_proxy_request_duration_seconds_bucket"]
    tok = [float(s.labels["le"]) for s in scrape.samples if s.name == "st_proxy_token_fetch_duration_seconds_bucket"]
    assert req == [*map(float, REQUEST_BUCKETS), float("inf")] and req[0] == 0.001 and req[-2] == 120
    assert tok == [*map(float, TOKEN_BUCKETS), float("inf")] and tok[0] == 0.005 and tok[-2] == 30


def _exposed(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.exposition).decode()


async def test_fixed_value_series_exist_at_zero_for_every_configured_tenant_before_any_traffic(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    scrape = Scrape(await scrape_text(proxy))
    for tenant in ("1000001", "1000002"):
        for kind in ("connect", "timeout", "reset"):
            assert scrape.value("st_proxy_upstream_errors_total", tenant=tenant, kind=kind) == 0
        for outcome in ("success", "rejected", "error"):
            assert scrape.value("st_proxy_token_fetches_total", tenant=tenant, outcome=outcome) == 0
        assert scrape.value("st_proxy_token_replays_total", tenant=tenant) == 0
        assert scrape.value("st_proxy_request_duration_seconds_count", tenant=tenant) == 0
        assert scrape.value("st_proxy_token_fetch_duration_seconds_count", tenant=tenant) == 0
        assert scrape.value("st_proxy_token_expires_in_seconds", tenant=tenant) == 0
    assert scrape.value("st_proxy_config_reloads_total", result="success") == 0
    assert scrape.value("st_proxy_config_reloads_total", result="failure") == 0
    assert scrape.value("st_proxy_build_info", version=__version__) == 1
    assert scrape.value("st_proxy_in_flight_requests") == 0
    assert scrape.series("st_proxy_requests_total") == []


async def test_created_series_are_left_out_of_the_exposition(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    await get(proxy, "/crm/v2/tenant/1000001/customers")
    text = await scrape_text(proxy)
    assert "st_proxy_requests_total{" in text
    assert "_created" not in text
    # The registry itself still has them: only the view served on /metrics drops them (no process-wide switch).
    assert (
        proxy.registry.get_sample_value(
            "st_proxy_requests_created", {"tenant": "1000001", "method": "GET", "code": "200"}
        )
        is not None
    )


async def test_metrics_can_be_asked_for_by_name(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    async with proxy.session.get(
        proxy.admin_url + "/metrics", params={"name[]": "st_proxy_build_info"}, headers={"Accept-Encoding": "identity"}
    ) as resp:
        scrape = Scrape(await resp.text())
    assert set(scrape.families) == {"st_proxy_build_info"}


async def test_metrics_are_gzip_compressed_for_a_scraper_that_asks_for_it(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    async with proxy.session.get(proxy.admin_url + "/metrics", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(await resp.read()).decode()
    assert Scrape(text).value("st_proxy_build_info", version=__version__) == 1


# -- bounded labels ----------------------------------------------------------------------------------------------


async def test_requests_naming_unconfigured_tenants_or_garbage_add_no_label_values(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    before = Scrape(await scrape_text(proxy)).label_values("tenant")
    assert before == {"1000001", "1000002"}
    odd = [
        ("GET", "/crm/v2/tenant/999/customers", {}),
        ("GET", "/crm/v2/tenant/99999999999999999999/customers", {}),
        ("GET", "/crm/v2/tenant/12345678901234567890123/customers", {}),
        ("GET", "/../../etc/passwd", {}),
        ("GET", "/crm/v2/tenant/%31%30%30/x", {}),
        ("GET", "/x", {"X-Tenant-ID": "abc"}),
        ("GET", "/x", {"X-Tenant-ID": "1000001; DROP"}),
        ("GET", "/crm/v2/tenant/1000001/x", {"X-Tenant-ID": "1000002"}),
        ("PROPFIND", "/crm/v2/tenant/777/x", {}),
        ("MKCOL", "/crm/v2/tenant/1000001/customers", {}),
        ("PURGE", "/crm/v2/tenant/1000001/customers", {}),
    ]
    for method, path, headers in odd:
        await get(proxy, path, method, headers=headers)
    await settled(proxy)
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.label_values("tenant") == {"1000001", "1000002", "none"}
    assert scrape.label_values("method") <= METHODS | {"other"}
    assert {s["method"] for s in scrape.series("st_proxy_requests_total")} == {"GET", "other"}
    total = sum(s.value for s in scrape.samples if s.name == "st_proxy_requests_total")
    assert total == len(odd)


def test_set_tenants_again_creates_added_tenants_series_and_removes_removed_ones():
    metrics = Metrics(CollectorRegistry())
    metrics.set_tenants(["1", "2"])
    metrics.request_done("2", "GET", 200, 0.01)
    metrics.request_done("2", "POST", 201, 0.01)
    metrics.request_done("1", "GET", 200, 0.01)
    metrics.set_tenants(["1", "3"])  # a reload removed 2 and added 3
    scrape = Scrape(_exposed(metrics))
    assert scrape.label_values("tenant") == {"1", "3"}
    assert scrape.value("st_proxy_requests_total", tenant="1", method="GET", code="200") == 1
    assert scrape.value("st_proxy_token_fetches_total", tenant="3", outcome="rejected") == 0
    metrics.request_done("2", "GET", 200, 0.01)  # a request for the removed tenant that was still in flight
    assert Scrape(_exposed(metrics)).value("st_proxy_requests_total", tenant="none", method="GET", code="200") == 1


def test_expiry_gauge_is_computed_at_scrape_time_from_the_clock(clock):
    metrics = Metrics(CollectorRegistry(), clock=clock)
    expiries = {"1": clock.now + 600, "2": None}
    metrics.watch_expiries(lambda: expiries.items())
    assert Scrape(_exposed(metrics)).value("st_proxy_token_expires_in_seconds", tenant="1") == 600
    clock.advance(250)
    scrape = Scrape(_exposed(metrics))
    assert scrape.value("st_proxy_token_expires_in_seconds", tenant="1") == 350
    assert scrape.value("st_proxy_token_expires_in_seconds", tenant="2") == 0
    clock.advance(1000)  # expired: 0, never negative
    assert Scrape(_exposed(metrics)).value("st_proxy_token_expires_in_seconds", tenant="1") == 0


# -- exact values after a scripted mix of traffic ----------------------------------------------------------------


async def test_every_metric_matches_a_scripted_mix_of_traffic(mixed, clock):
    sim, proxy = mixed
    sent: list[int] = []

    async def send(path: str, method: str = "GET", **kwargs: Any) -> int:
        status = await get(proxy, path, method, **kwargs)
        sent.append(status)
        return status

    assert [await send(api(OK)) for _ in range(3)] == [200] * 3
    assert await send(api(OK), "POST", json={"name": "x"}) == 201
    assert await send(api(OK, "customers/9999999")) == 404  # an upstream error passes through
    assert await send(api(OK) + "?pageSize=9999") == 400
    sim.revoke_tokens(OK)
    assert await send(api(OK)) == 200  # upstream 401, a new token, one replay
    # A download in flight shows in the in-flight gauge.
    async with proxy.session.get(proxy.url + api(OK, "download?bytes=4&chunk=1&delay=0.05")) as resp:
        assert resp.status == 200
        mid = Scrape(await scrape_text(proxy))
        await resp.read()
    sent.append(200)
    assert mid.value("st_proxy_in_flight_requests") == 1
    assert [await send(api(REJECTED)) for _ in range(2)] == [502, 502]  # rejected once, then the cool-off
    assert [await send(api(REFUSED)) for _ in range(2)] == [502, 502]
    assert await send(api(RESET)) == 502
    assert await send(api(SILENT)) == 504
    assert await send("/crm/v2/tenant/999/customers") == 403
    assert await send("/crm/v2/tenant/99999999999999999999/customers") == 403
    assert await send("/crm/v2/tenant/999/customers", "PROPFIND") == 403
    assert await send("/anything", headers={"X-Tenant-ID": "abc"}) == 400
    assert await send("/no/tenant/here") == 400
    # The healthy tenant's token expires while the token endpoint fails once: 503, then a success after the backoff.
    clock.advance(TTL + 100)
    sim.fail_tokens(503, "down for maintenance", times=1)
    assert await send(api(OK)) == 503
    clock.advance(61)
    assert await send(api(OK)) == 200

    await settled(proxy)
    s = Scrape(await scrape_text(proxy))
    requests = {
        (x["tenant"], x["method"], x["code"]): s.value("st_proxy_requests_total", **x)
        for x in s.series("st_proxy_requests_total")
    }
    assert requests == {
        (OK, "GET", "200"): 6,
        (OK, "POST", "201"): 1,
        (OK, "GET", "404"): 1,
        (OK, "GET", "400"): 1,
        (OK, "GET", "503"): 1,
        (REJECTED, "GET", "502"): 2,
        (REFUSED, "GET", "502"): 2,
        (RESET, "GET", "502"): 1,
        (SILENT, "GET", "504"): 1,
        ("none", "GET", "403"): 2,
        ("none", "other", "403"): 1,
        ("none", "GET", "400"): 2,
    }
    assert sum(requests.values()) == len(sent)
    per_tenant = {OK: 10, REJECTED: 2, REFUSED: 2, RESET: 1, SILENT: 1, "none": 5}
    for tenant, count in per_tenant.items():
        assert s.value("st_proxy_request_duration_seconds_count", tenant=tenant) == count
        assert s.value("st_proxy_request_duration_seconds_bucket", tenant=tenant, le="+Inf") == count
        assert s.value("st_proxy_request_duration_seconds_sum", tenant=tenant) > 0
    errors = {
        (t, k): s.value("st_proxy_upstream_errors_total", tenant=t, kind=k)
        for t in TENANTS
        for k in ("connect", "timeout", "reset")
    }
    assert {key: v for key, v in errors.items() if v} == {
        (REFUSED, "connect"): 2,
        (RESET, "reset"): 1,
        (SILENT, "timeout"): 1,
    }
    fetches = {
        (t, o): s.value("st_proxy_token_fetches_total", tenant=t, outcome=o)
        for t in TENANTS
        for o in ("success", "rejected", "error")
    }
    assert {key: v for key, v in fetches.items() if v} == {
        (OK, "success"): 3,
        (OK, "error"): 1,
        (REJECTED, "rejected"): 1,
        (REFUSED, "success"): 1,
        (RESET, "success"): 1,
        (SILENT, "success"): 1,
    }
    assert sum(fetches.values()) == sim.token_requests
    for tenant in TENANTS:
        count = sum(v for (t, _), v in fetches.items() if t == tenant)
        assert s.value("st_proxy_token_fetch_duration_seconds_count", tenant=tenant) == count
        assert s.value("st_proxy_token_fetch_duration_seconds_bucket", tenant=tenant, le="+Inf") == count
    assert {t: s.value("st_proxy_token_replays_total", tenant=t) for t in TENANTS} == {
        OK: 1,
        REJECTED: 0,
        REFUSED: 0,
        RESET: 0,
        SILENT: 0,
    }
    # The healthy tenant's token was fetched just now (the clock has not moved since); the others have none usable.
    assert {t: s.value("st_proxy_token_expires_in_seconds", tenant=t) for t in TENANTS} == {
        OK: TTL,
        REJECTED: 0,
        REFUSED: 0,
        RESET: 0,
        SILENT: 0,
    }
    assert s.value("st_proxy_in_flight_requests") == 0
    assert s.value("st_proxy_config_reloads_total", result="success") == 0
    assert s.value("st_proxy_config_reloads_total", result="failure") == 0
    assert s.value("st_proxy_build_info", version=__version__) == 1
    assert s.label_values("tenant") == {*TENANTS, "none"}
    clock.advance(100)
    later = Scrape(await scrape_text(proxy))
    assert later.value("st_proxy_token_expires_in_seconds", tenant=OK) == TTL - 100


async def test_scraping_the_admin_port_is_not_counted_as_data_plane_traffic(mixed):
    """The admin port is a separate app: scraping it is not counted as data-plane traffic."""
    _, proxy = mixed
    for _ in range(3):
        await scrape_text(proxy)
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.series("st_proxy_requests_total") == []
    async with aiohttp.ClientSession() as session, session.get(proxy.admin_url + "/healthz") as resp:
        assert resp.status == 200
    assert Scrape(await scrape_text(proxy)).series("st_proxy_requests_total") == []
