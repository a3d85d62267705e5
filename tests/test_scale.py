"""Thousands of tenants (docs/scaling.md): ``metrics.tenant_histograms`` both ways, ``/metrics`` rendered off the event
loop by the fast text writer, and the per-tenant work of reloads and file watching. Sizes and counts only: speed is
measured by bench/scale.py, never asserted here."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from conftest import T1, FakeClock, sim_config
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from test_reload import KubeVolume
from test_tokens import gated_simulator  # noqa: F401 (a fixture)

from st_proxy.config import ConfigError, from_mapping
from st_proxy.config.file_watch import FileWatch
from st_proxy.devtools.simulator import DEMO_APP_KEY
from st_proxy.ops import text_format
from st_proxy.ops.exposition import MetricsPage
from st_proxy.ops.metrics import Metrics

HISTOGRAMS = ("st_proxy_request_duration_seconds", "st_proxy_token_fetch_duration_seconds")


def raw_config(n: int = 1, **sections) -> dict:
    return {
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"sim": {"auth_url": "http://127.0.0.1:9/connect/token", "api_url": "http://127.0.0.1:9"}},
        "tenants": {
            str(4_000_000 + i): {"environment": "sim", "client_id": f"cid.{i}", "client_secret": {"value": f"cs.{i}"}}
            for i in range(n)
        },
        **sections,
    }


def samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


# -- config ---------------------------------------------------------------------------------------------------------
def test_the_scale_settings_default_to_histograms_by_tenant_20_requests_a_second_and_10_seconds():
    config = from_mapping(raw_config(), {})
    assert config.metrics.tenant_histograms is True
    assert (config.tokens.prewarm_rate_per_second, config.tokens.prewarm_ready_seconds) == (20, 10)
    tuned = from_mapping(
        raw_config(
            metrics={"tenant_histograms": False},
            tokens={"prewarm_rate_per_second": 2.5, "prewarm_ready_seconds": 0},
        ),
        {},
    )
    assert tuned.metrics.tenant_histograms is False
    assert (tuned.tokens.prewarm_rate_per_second, tuned.tokens.prewarm_ready_seconds) == (2.5, 0)


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"metrics": {"tenant_histograms": "no"}}, "metrics.tenant_histograms: expected true or false, got a string"),
        ({"metrics": {"tenant_histogram": False}}, "metrics.tenant_histogram: unknown key"),
        ({"metrics": []}, "metrics: expected a mapping, got a list"),
        (
            {"tokens": {"prewarm_rate_per_second": 0}},
            "tokens.prewarm_rate_per_second: expected a number greater than 0",
        ),
        ({"tokens": {"prewarm_rate_per_second": True}}, "tokens.prewarm_rate_per_second: expected a number greater"),
        ({"tokens": {"prewarm_ready_seconds": -1}}, "tokens.prewarm_ready_seconds: expected a number of seconds >= 0"),
    ],
)
def test_bad_scale_settings_are_named_by_their_path(sections, problem):
    with pytest.raises(ConfigError) as error:
        from_mapping(raw_config(**sections), {})
    assert any(p.startswith(problem) for p in error.value.problems), error.value.problems


# -- tenant_histograms ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("by_tenant", [True, False])
async def test_duration_histograms_carry_the_tenant_label_only_with_tenant_histograms(
    simulator, start_proxy, by_tenant
):
    proxy = await start_proxy(sim_config(simulator, metrics={"tenant_histograms": by_tenant}))
    await proxy.runtime.tokens.wait_attempted(proxy.runtime.holder.current.tenants.values())
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers") as resp:
        assert resp.status == 200
    found = samples(await proxy.metrics_text())
    for name in HISTOGRAMS:
        series = found[name]
        assert series, name
        assert all(("tenant" in s.labels) == by_tenant for s in series), name
        assert {s.name for s in series} == {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    counts = {
        (name, s.labels.get("tenant")): s.value for name in HISTOGRAMS for s in found[name] if s.name.endswith("_count")
    }
    if by_tenant:
        assert counts[("st_proxy_request_duration_seconds", T1.tenant_id)] == 1
        assert counts[("st_proxy_token_fetch_duration_seconds", T1.tenant_id)] == 1
    else:  # one series each, the sum over the tenants: two prewarm fetches, one request
        assert counts == {
            ("st_proxy_request_duration_seconds", None): 1,
            ("st_proxy_token_fetch_duration_seconds", None): 2,
        }
    # The counters keep their tenant label either way.
    assert {s.labels["tenant"] for s in found["st_proxy_token_fetches"]} == {"1000001", "1000002"}


@pytest.mark.parametrize(("by_tenant", "per_tenant"), [(True, 8 + 19 + 15), (False, 8)])
async def test_a_thousand_tenants_cost_a_fixed_number_of_series_each(start_proxy, by_tenant, per_tenant):
    config = from_mapping(raw_config(1000, metrics={"tenant_histograms": by_tenant}), {})
    proxy = await start_proxy(config, prewarm=False)
    text = await proxy.metrics_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert sum('tenant="4' in line for line in lines) == 1000 * per_tenant
    # 3 upstream error kinds, 3 token outcomes, replays, expiry; 16 + 1 request buckets and 12 + 1 token buckets
    # with their _count and _sum.
    # Plus reloads (2), build, in flight, and the callers' st_proxy_client_auth_total for client "none" (2 results).
    assert len(lines) - 1000 * per_tenant == (0 if by_tenant else 19 + 15) + 2 + 1 + 1 + 2


async def test_reloading_metrics_settings_needs_a_restart_and_keeps_the_running_value(tmp_path, start_proxy):
    from st_proxy.config import load_file
    from st_proxy.server.reload import Reloader

    path = tmp_path / "config.yaml"
    path.write_text(f"app_key: {DEMO_APP_KEY}\ntenants: {{'42': {{client_id: c, client_secret: s}}}}\n")
    proxy = await start_proxy(load_file(path, {}), prewarm=False)
    reloader = Reloader(
        proxy.runtime.holder,
        proxy.runtime.metrics,
        tokens=lambda: proxy.runtime.tokens,
        load=lambda: load_file(path, {}),
    )
    path.write_text(path.read_text() + "metrics: {tenant_histograms: false}\n")
    assert await reloader.reload_now() is True
    assert proxy.runtime.holder.current.metrics.tenant_histograms is True
    assert proxy.runtime.metrics.tenant_histograms is True


# -- the text writer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("by_tenant", [True, False])
def test_the_fast_writer_writes_exactly_what_prometheus_client_writes(by_tenant):
    registry = CollectorRegistry()
    metrics = Metrics(registry, tenant_histograms=by_tenant, clock=FakeClock())
    ids = [str(4_000_000 + i) for i in range(50)]
    metrics.set_tenants(ids)
    metrics.watch_expiries(lambda: ((t, 1_800_000_900.0 if int(t) % 2 else None) for t in ids))
    for i, tenant in enumerate(ids):
        metrics.request_done(tenant, "GET", 200, i / 100)
        metrics.token_fetched(tenant, "success", 0.2)
    metrics.request_done(None, "PROPFIND", 403, 0.001)
    metrics.upstream_error(ids[0], "reset")
    metrics.in_flight.inc()
    # A family someone else registers, with label values that need escaping: the writer handles it too.
    other = Counter("other_events", "Help with a \\ and\na newline", ["what"], registry=registry)
    other.labels('a "quoted"\\ value\nover two lines').inc(3)
    other.labels("big").inc(1.5e9)

    assert text_format.render(registry) == generate_latest(metrics.exposition)


def test_a_collector_the_writer_does_not_know_is_written_by_prometheus_client():
    registry = CollectorRegistry()

    class Custom:
        def collect(self):
            family = GaugeMetricFamily("custom_thing", "A custom collector", labels=["k"])
            family.add_metric(["v"], 2)
            yield family

    registry.register(Custom())
    assert text_format.render(registry) == generate_latest(registry)


# -- rendering off the event loop -----------------------------------------------------------------------------------
class Blocking:
    """A collector that holds the render in ``collect`` until released, noting the thread it was called on."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.threads: list[threading.Thread] = []

    def collect(self):
        self.calls += 1
        self.threads.append(threading.current_thread())
        self.entered.set()
        assert self.release.wait(10)
        yield GaugeMetricFamily("blocking_collector", "Held until released", value=1)


async def test_a_scrape_in_progress_never_holds_up_the_data_port(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    blocking = Blocking()
    proxy.registry.register(blocking)
    try:
        scrape = asyncio.ensure_future(proxy.metrics_text())
        assert await asyncio.to_thread(blocking.entered.wait, 10)
        # The render is stuck half-way; the data port answers regardless, and so does the rest of the admin port.
        async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers") as resp:
            assert resp.status == 200
        async with proxy.session.get(f"{proxy.admin_url}/healthz") as resp:
            assert resp.status == 200
        assert not scrape.done()
    finally:
        blocking.release.set()
    assert "blocking_collector 1.0" in await scrape
    assert blocking.threads and all(t is not threading.main_thread() for t in blocking.threads)


async def test_concurrent_scrapes_share_one_render():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    blocking = Blocking()
    registry.register(blocking)
    page = MetricsPage(metrics)
    first = asyncio.ensure_future(page.render())
    assert await asyncio.to_thread(blocking.entered.wait, 10)
    second = asyncio.ensure_future(page.render())
    for _ in range(5):
        await asyncio.sleep(0)  # loop turns: the second ask reaches the pending render
    blocking.release.set()
    assert await first == await second
    assert blocking.calls == 1
    third = await page.render()  # a later scrape renders afresh
    assert blocking.calls == 2 and third == await first


async def test_gzip_is_served_when_asked_for(simulator, start_proxy):
    import gzip

    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    async with proxy.session.get(f"{proxy.admin_url}/metrics", headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = gzip.decompress(await resp.read()).decode()
    assert body == await proxy.metrics_text()


# -- per-tenant work ------------------------------------------------------------------------------------------------
async def test_series_are_created_in_steps_but_the_tenant_label_bound_changes_at_once():
    metrics = Metrics(CollectorRegistry(), tenant_histograms=False)
    metrics.set_tenants(["1", "2"])
    metrics.request_done("2", "GET", 200, 0.1)
    steps = asyncio.ensure_future(metrics.set_tenants_stepwise([str(i) for i in range(3, 23)], batch=5))
    await asyncio.sleep(0)  # one loop turn: the first batch is done, the rest are not
    assert metrics.tenant_label("22") == "22" and metrics.tenant_label("2") == "none"
    assert not steps.done()
    await steps
    text = text_format.render(metrics.registry).decode()
    assert 'tenant="2"' not in text and 'tenant="1"' not in text
    assert all(f'st_proxy_token_replays_total{{tenant="{i}"}} 0.0' in text for i in range(3, 23))


def test_the_file_watch_sees_one_changed_file_among_a_thousand_and_adds_new_ones_linearly(tmp_path):
    paths = []
    for i in range(1000):
        path = tmp_path / f"s{i}"
        path.write_text("secret\n")
        paths.append(path)
    watch = FileWatch(paths)
    assert watch.changed() == []
    paths[500].write_text("rotated\n")
    assert watch.changed() == [paths[500]]
    extra = tmp_path / "new"
    watch.add([*paths, extra])  # already watched paths keep their state; the new one is watched from now
    assert len(watch.paths) == 1001 and watch.changed() == []
    extra.write_text("x")
    assert watch.changed() == [extra]


def test_a_kubernetes_swap_to_a_file_of_the_same_size_and_time_is_seen_by_its_inode(tmp_path):
    volume = KubeVolume(tmp_path / "secrets")
    volume.update({"client_secret": "cs.one\n"})
    path = volume.path("client_secret")
    stamp = os.stat(path).st_mtime_ns
    watch = FileWatch([path])
    volume.update({"client_secret": "cs.two\n"})  # same length
    os.utime(path, ns=(stamp, stamp))  # and the same modification time
    assert watch.changed() == [path]


def test_a_look_taken_before_watch_was_reset_does_not_touch_paths_no_longer_watched(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("1")
    b.write_text("1")
    watch = FileWatch([a, b])
    from st_proxy.config.file_watch import snapshots

    seen = snapshots(watch.paths)  # what a poll in the worker thread saw
    watch.watch([a])  # meanwhile a reload watches a different set
    b.write_text("22")
    assert watch.compare({**seen, b: None}) == []
    assert watch.paths == (Path(a),)


# -- the real process -----------------------------------------------------------------------------------------------
async def test_serve_with_prewarm_ready_seconds_0_is_ready_at_once_and_says_how_many_tenants_still_warm(
    gated_simulator, tmp_path
):
    import json
    import signal
    import sys

    import aiohttp
    import yaml
    from test_tokens import TokenGate

    gate = TokenGate()
    gate.close()  # no token answer until the test says so
    sim = await gated_simulator(gate)
    config = yaml.safe_load(f"listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\napp_key: {DEMO_APP_KEY}\n")
    config["environments"] = {"sim": {"auth_url": sim.auth_url, "api_url": sim.base_url}}
    config["tenants"] = {
        t.tenant_id: {"environment": "sim", "client_id": t.client_id, "client_secret": t.client_secret}
        for t in sim.tenants.values()
    }
    config["tokens"] = {"prewarm_ready_seconds": 0}
    config["shutdown"] = {"drain_seconds": 0, "timeout_seconds": 5}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "st_proxy", "serve", "--config", str(path), stdout=asyncio.subprocess.PIPE
    )
    records: list[dict] = []
    try:

        async def until(event: str) -> dict:
            while True:
                line = await proc.stdout.readline()
                assert line, f"stdout closed before {event}"
                records.append(json.loads(line))
                if records[-1].get("event") == event:
                    return records[-1]

        start = await asyncio.wait_for(until("start"), 30)
        ready = await asyncio.wait_for(until("ready"), 30)
        assert ready["prewarm_pending"] == len(sim.tenants)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{start['admin_listen']}/readyz") as resp:
                assert resp.status == 200
            async with session.get(f"http://{start['admin_listen']}/tenants") as resp:
                states = {t["token"]["state"] for t in (await resp.json())["tenants"]}
        # No token yet: the first fetches wait at the token endpoint, the rest for their turn.
        assert "refreshing" in states and states <= {"refreshing", "none"}
    finally:
        gate.open()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
