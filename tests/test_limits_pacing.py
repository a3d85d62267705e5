"""Pacing in one process (docs/limits.md), through the real proxy on loopback in front of a recording upstream. Time
is the test's: the proxy's clock and its waits are driven by ``ManualClock``, so nothing here sleeps for real time
and no assertion depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from conftest import T1, T2, FakeClock
from recording_upstream import RecordingUpstream
from test_metrics import Scrape, scrape_text, settled

from st_proxy.config import from_mapping, load_file
from st_proxy.devtools.simulator import DEMO_APP_KEY
from st_proxy.server.reload import Reloader

CUSTOMERS = f"/crm/v2/tenant/{T1.tenant_id}/customers"
OTHER_TENANT = f"/crm/v2/tenant/{T2.tenant_id}/customers"
SLOW = f"/crm/v2/tenant/{T1.tenant_id}/export/slow"


def report(number: str) -> str:
    return f"/reporting/v2/tenant/{T1.tenant_id}/report-category/operations/reports/{number}/data"


EPSILON = 1e-5  # the clock reads like time.time() (1.8e9 s): its float steps are ~2e-7 s


def near(value: float | list[float]):
    return pytest.approx(value, abs=EPSILON)


class ManualClock(FakeClock):
    """The proxy's clock and its ``sleep``: a sleeper wakes when the test has moved the clock past its end."""

    def __init__(self) -> None:
        super().__init__()
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.sleeps: list[float] = []  # every wait asked for, in order

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.now + seconds, asyncio.get_running_loop().create_future())
        self.sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self.sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for end, waiter in self.sleepers:
            if end <= self.now + EPSILON and not waiter.done():
                waiter.set_result(None)


async def until(check: Callable[[], bool], what: str) -> None:
    """Let the event loop run until ``check()`` holds; bounded (never a timing assertion)."""
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{what} did not happen")


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    up = RecordingUpstream()
    await up.start()
    yield up
    await up.stop()


def config_for(
    up: RecordingUpstream, limits: dict[str, Any] | None, metrics: dict[str, Any] | None = None, **tenant_extra: Any
):
    raw: dict[str, Any] = {
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"sim": {"auth_url": up.auth_url, "api_url": up.base_url}},
        "tenants": {
            t.tenant_id: {
                "environment": "sim",
                "client_id": t.client_id,
                "client_secret": {"value": t.client_secret},
                **tenant_extra.get(t.tenant_id, {}),
            }
            for t in (T1, T2)
        },
    }
    if limits is not None:
        raw["limits"] = limits
    if metrics is not None:
        raw["metrics"] = metrics
    return from_mapping(raw, {})


@pytest.fixture
def manual() -> ManualClock:
    return ManualClock()


@pytest.fixture
def proxy_with(start_proxy, upstream, manual):
    async def start(limits: dict[str, Any] | None, **tenant_extra: Any):
        # No prewarm: its pacing waits through the same injected sleep, and these tests count the limiter's sleepers.
        return await start_proxy(
            config_for(upstream, limits, **tenant_extra), clock=manual, sleep=manual.sleep, prewarm=False
        )

    return start


async def call(proxy, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    # Bounded: a request that never finishes fails the test instead of hanging it.
    async with proxy.session.request(method, proxy.url + path, timeout=aiohttp.ClientTimeout(total=20)) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def spawn(proxy, path: str, method: str = "GET") -> asyncio.Task[tuple[int, dict[str, str], bytes]]:
    return asyncio.create_task(call(proxy, path, method))


async def test_requests_over_the_burst_are_spaced_one_interval_apart(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 10, "burst": 2})
    calls = [spawn(proxy, CUSTOMERS) for _ in range(5)]
    await until(lambda: len(manual.sleepers) == 3 and len(upstream.arrivals) == 2, "two sent, three waiting")
    assert sorted(end - manual.now for end, _ in manual.sleepers) == near([0.1, 0.2, 0.3])
    for expected in (3, 4, 5):
        manual.advance(0.1)
        await until(lambda n=expected: len(upstream.arrivals) == n, f"arrival {expected}")
    assert [status for status, _, _ in await asyncio.gather(*calls)] == [200] * 5
    await settled(proxy)
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.value("st_proxy_rate_limited_total", tenant=T1.tenant_id, outcome="delayed") == 3
    assert scrape.value("st_proxy_rate_limited_total", tenant=T1.tenant_id, outcome="rejected") == 0
    assert scrape.value("st_proxy_rate_limit_wait_seconds_count", tenant=T1.tenant_id) == 5
    assert scrape.value("st_proxy_rate_limit_wait_seconds_sum", tenant=T1.tenant_id) == near(0.6)
    assert scrape.value("st_proxy_state_backend_up") == 1


async def test_a_wait_past_the_deadline_is_refused_with_retry_after_and_reserves_nothing(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 1, "burst": 1, "max_wait_seconds": 0.5})
    assert (await call(proxy, CUSTOMERS))[0] == 200
    for _ in range(3):  # refused again and again: none of them may push the next slot back
        status, headers, body = await call(proxy, CUSTOMERS)
        assert status == 429
        assert headers["X-ST-Proxy-Error"] == "rate_limited"
        assert headers["Retry-After"] == "1"
        problem = json.loads(body)
        assert (problem["status"], problem["tenant"]) == (429, T1.tenant_id)
    manual.advance(0.6)  # the next slot is 0.4 s away: within the deadline
    late = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the request waits for its slot")
    assert manual.sleepers[0][0] - manual.now == near(0.4)
    manual.advance(0.4)
    assert (await late)[0] == 200
    assert len(upstream.arrivals) == 2
    await settled(proxy)
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.value("st_proxy_rate_limited_total", tenant=T1.tenant_id, outcome="rejected") == 3


async def test_one_tenant_at_its_concurrency_cap_gets_tenant_busy_while_others_pass(proxy_with, upstream, manual):
    upstream.gate = asyncio.Event()
    proxy = await proxy_with({"rate_per_second": None, "max_concurrent_per_tenant": 1, "max_wait_seconds": 2})
    slow = spawn(proxy, SLOW)
    await until(lambda: len(upstream.arrivals) == 1, "the slow export reached the upstream")
    queued = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the second request waits for a slot")
    assert (await call(proxy, OTHER_TENANT))[0] == 200  # another tenant is not held up
    manual.advance(2.1)
    status, headers, body = await queued
    assert (status, headers["X-ST-Proxy-Error"], headers["Retry-After"]) == (503, "tenant_busy", "1")
    assert json.loads(body)["tenant"] == T1.tenant_id
    upstream.gate.set()
    assert (await slow)[0] == 200
    await settled(proxy)
    assert (await call(proxy, CUSTOMERS))[0] == 200  # the slot came back once the answer was relayed
    assert upstream.paths().count(CUSTOMERS) == 1


async def test_a_concurrency_slot_passes_to_the_next_waiter_when_an_answer_is_relayed(proxy_with, upstream, manual):
    upstream.gate = asyncio.Event()
    proxy = await proxy_with({"rate_per_second": None, "max_concurrent_per_tenant": 1})
    slow = spawn(proxy, SLOW)
    await until(lambda: len(upstream.arrivals) == 1, "the slow export reached the upstream")
    queued = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the second request waits for a slot")
    assert len(upstream.arrivals) == 1
    upstream.gate.set()
    assert [(await slow)[0], (await queued)[0]] == [200, 200]
    assert upstream.paths() == [SLOW, CUSTOMERS]


async def test_an_upstream_429_passes_back_unchanged_and_holds_the_budget_until_retry_after(
    proxy_with, upstream, manual
):
    proxy = await proxy_with({"rate_per_second": 100, "burst": 10, "retry_throttled": False})
    upstream.queued.append((429, {"Retry-After": "3", "X-Upstream": "yes"}, b'{"title":"Too Many Requests"}'))
    status, headers, body = await call(proxy, CUSTOMERS)
    assert (status, headers["Retry-After"], headers["X-Upstream"], body) == (
        429,
        "3",
        "yes",
        b'{"title":"Too Many Requests"}',
    )
    assert "X-ST-Proxy-Error" not in headers
    held = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the next request waits out the hold")
    assert manual.sleepers[0][0] - manual.now == near(3)
    assert (await call(proxy, OTHER_TENANT))[0] == 200  # only that tenant's budget is held
    manual.advance(3)
    assert (await held)[0] == 200
    await settled(proxy)
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.value("st_proxy_upstream_throttled_total", tenant=T1.tenant_id) == 1
    assert scrape.value("st_proxy_upstream_throttled_total", tenant=T2.tenant_id) == 0


async def test_a_throttled_get_is_retried_once_after_retry_after_and_a_post_is_not(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 100, "burst": 10})
    upstream.queued.append((429, {"Retry-After": "2"}, b"slow down"))
    retried = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the retry waits out Retry-After")
    assert len(upstream.arrivals) == 1
    manual.advance(2)
    assert (await retried)[0] == 200
    assert len(upstream.arrivals) == 2

    manual.advance(1)  # after a hold requests are spaced from its end: let that pass
    upstream.queued.append((429, {}, b"no"))
    status, _, body = await call(proxy, CUSTOMERS, "POST")
    assert (status, body) == (429, b"no")
    assert len(upstream.arrivals) == 3
    blocked = spawn(proxy, CUSTOMERS)  # no Retry-After: held 1 s
    await until(lambda: len(manual.sleepers) == 1, "the next request waits out the default hold")
    assert manual.sleepers[0][0] - manual.now == near(1)
    manual.advance(1)
    assert (await blocked)[0] == 200


async def test_a_throttled_get_whose_retry_after_does_not_fit_the_deadline_gets_the_429(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 100, "max_wait_seconds": 5})
    upstream.queued.append((429, {"Retry-After": "30"}, b"later"))
    status, headers, body = await call(proxy, CUSTOMERS)
    assert (status, headers["Retry-After"], body) == (429, "30", b"later")
    assert len(upstream.arrivals) == 1 and manual.sleepers == []


async def test_a_second_429_on_the_retry_goes_back_to_the_caller(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 100})
    upstream.queued.extend([(429, {"Retry-After": "1"}, b"one"), (429, {"Retry-After": "1"}, b"two")])
    retried = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the retry waits")
    manual.advance(1)
    status, _, body = await retried
    assert (status, body) == (429, b"two")
    assert len(upstream.arrivals) == 2


async def test_waiting_requests_check_for_a_hold_before_they_send(proxy_with, upstream, manual):
    upstream.gate = asyncio.Event()
    proxy = await proxy_with({"rate_per_second": 1, "burst": 1, "retry_throttled": False})
    first = spawn(proxy, SLOW)
    await until(lambda: len(upstream.arrivals) == 1, "the first request is upstream")
    waiting = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the second waits for its slot (1 s)")
    upstream.queued.append((429, {"Retry-After": "3"}, b""))
    upstream.gate.set()
    assert (await first)[0] == 429  # the budget is held for 3 s from now
    manual.advance(1)  # the second request's slot has come, but so has the hold
    await until(lambda: len(manual.sleepers) == 1 and manual.sleepers[0][0] > manual.now, "it waits again")
    assert manual.sleepers[0][0] - manual.now == near(2)
    assert len(upstream.arrivals) == 1
    manual.advance(2)
    assert (await waiting)[0] == 200


async def test_a_hold_spaces_the_queue_instead_of_releasing_it_at_once(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 10, "burst": 5, "retry_throttled": False})
    upstream.queued.append((429, {"Retry-After": "1"}, b""))
    assert (await call(proxy, CUSTOMERS))[0] == 429
    queue = [spawn(proxy, CUSTOMERS) for _ in range(3)]
    await until(lambda: len(manual.sleepers) == 3, "three wait for the hold to end")
    assert sorted(end - manual.now for end, _ in manual.sleepers) == near([1.0, 1.1, 1.2])
    manual.advance(1)
    await until(lambda: len(upstream.arrivals) == 2, "the first after the hold")
    assert len(manual.sleepers) == 2
    manual.advance(0.2)
    assert [s for s, _, _ in await asyncio.gather(*queue)] == [200] * 3


async def test_report_runs_are_paced_per_report_and_spend_nothing_of_the_tenant_budget(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 1, "burst": 1, "reports_per_minute": 1, "max_wait_seconds": 5})
    assert (await call(proxy, report("42"), "POST"))[0] == 200
    status, headers, _ = await call(proxy, report("42"), "POST")
    assert (status, headers["X-ST-Proxy-Error"], headers["Retry-After"]) == (429, "rate_limited", "55")
    assert (await call(proxy, report("43"), "POST"))[0] == 200  # another report has its own allowance
    assert (await call(proxy, CUSTOMERS))[0] == 200  # the 60/s budget was not touched by the reports
    assert manual.sleepers == []
    assert upstream.paths() == [report("42"), report("43"), CUSTOMERS]


async def test_a_429_on_a_report_holds_only_that_report(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 100, "reports_per_minute": None, "max_wait_seconds": 5})
    upstream.queued.append((429, {"Retry-After": "10"}, b""))
    assert (await call(proxy, report("42"), "POST"))[0] == 429
    status, headers, _ = await call(proxy, report("42"), "POST")
    assert (status, headers["X-ST-Proxy-Error"]) == (429, "rate_limited")  # held 10 s: does not fit 5 s
    assert (await call(proxy, report("43"), "POST"))[0] == 200
    assert (await call(proxy, CUSTOMERS))[0] == 200
    assert manual.sleepers == [] and len(upstream.arrivals) == 3


async def test_a_caller_that_hangs_up_while_waiting_never_sends_and_gives_its_slot_back(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 1, "burst": 1})
    assert (await call(proxy, CUSTOMERS))[0] == 200
    leaving = spawn(proxy, CUSTOMERS)
    await until(lambda: len(manual.sleepers) == 1, "the second request waits")
    leaving.cancel()  # closes the caller's connection
    await until(lambda: manual.sleepers == [], "the proxy noticed the caller left")
    manual.advance(1)
    assert (await call(proxy, CUSTOMERS))[0] == 200  # at once: the slot that was given back
    assert manual.sleepers == [] and len(upstream.arrivals) == 2


async def test_a_tenant_rate_override_paces_that_tenant_alone(proxy_with, upstream, manual):
    proxy = await proxy_with({"rate_per_second": 100, "burst": 1}, **{T1.tenant_id: {"rate_per_second": 0.5}})
    for path in (CUSTOMERS, OTHER_TENANT):
        assert (await call(proxy, path))[0] == 200
    waits = [spawn(proxy, CUSTOMERS), spawn(proxy, OTHER_TENANT)]
    await until(lambda: len(manual.sleepers) == 2, "both wait")
    assert sorted(end - manual.now for end, _ in manual.sleepers) == near([0.01, 2])
    manual.advance(2)
    assert [s for s, _, _ in await asyncio.gather(*waits)] == [200, 200]


async def test_without_limits_nothing_waits_429s_pass_and_no_limits_metrics_exist(proxy_with, upstream, manual):
    proxy = await proxy_with(None)
    upstream.queued.append((429, {"Retry-After": "30"}, b"busy"))
    status, headers, body = await call(proxy, CUSTOMERS)
    assert (status, headers["Retry-After"], body) == (429, "30", b"busy")
    statuses = [s for s, _, _ in await asyncio.gather(*(call(proxy, CUSTOMERS) for _ in range(20)))]
    assert statuses == [200] * 20  # no hold, no pacing, no retry
    assert manual.sleeps == [] and len(upstream.arrivals) == 21
    text = await scrape_text(proxy)
    for name in ("rate_limited", "rate_limit_wait", "upstream_throttled", "state_backend_up", "state_errors"):
        assert f"st_proxy_{name}" not in text


async def test_limits_series_exist_from_start_and_the_wait_histogram_can_drop_the_tenant_label(start_proxy, upstream):
    labelled = await start_proxy(config_for(upstream, {}))
    scrape = Scrape(await scrape_text(labelled))
    for tenant in (T1.tenant_id, T2.tenant_id):
        for outcome in ("delayed", "rejected"):
            assert scrape.value("st_proxy_rate_limited_total", tenant=tenant, outcome=outcome) == 0
        assert scrape.value("st_proxy_upstream_throttled_total", tenant=tenant) == 0
        assert scrape.value("st_proxy_rate_limit_wait_seconds_count", tenant=tenant) == 0
    assert scrape.value("st_proxy_state_errors_total") == 0

    plain = await start_proxy(config_for(upstream, {}, metrics={"tenant_histograms": False}))
    assert (await call(plain, CUSTOMERS))[0] == 200
    await settled(plain)
    scrape = Scrape(await scrape_text(plain))
    assert scrape.value("st_proxy_rate_limit_wait_seconds_count") == 1
    assert all("tenant" not in labels for labels in scrape.series("st_proxy_rate_limit_wait_seconds_bucket"))


async def test_a_reload_changes_the_limits_for_new_requests_and_can_turn_them_on(
    tmp_path, start_proxy, upstream, manual
):
    path = tmp_path / "config.yaml"

    def write(limits: dict[str, Any] | None) -> None:
        raw = {
            "app_key": {"value": DEMO_APP_KEY},
            "environments": {"sim": {"auth_url": upstream.auth_url, "api_url": upstream.base_url}},
            "tenants": {T1.tenant_id: {"environment": "sim", "client_id": T1.client_id, "client_secret": "x"}},
        }
        if limits is not None:
            raw["limits"] = limits
        path.write_text(json.dumps(raw))

    write(None)
    proxy = await start_proxy(load_file(path, {}), clock=manual, sleep=manual.sleep)
    reloader = Reloader(proxy.runtime.holder, proxy.runtime.metrics, tokens=lambda: proxy.runtime.tokens,
                        load=lambda: load_file(path, {}), poll_seconds=0)  # fmt: skip
    assert [(await call(proxy, CUSTOMERS))[0] for _ in range(3)] == [200] * 3

    write({"rate_per_second": 1, "burst": 1, "max_wait_seconds": 0})
    assert await reloader.reload_now()
    assert (await call(proxy, CUSTOMERS))[0] == 200
    assert (await call(proxy, CUSTOMERS))[0] == 429  # paced from the reload on
    assert "st_proxy_rate_limited_total" in await scrape_text(proxy)  # its metrics exist from then on

    write({"rate_per_second": 1000, "burst": 100, "max_wait_seconds": 0})
    assert await reloader.reload_now()
    manual.advance(1)  # the slot reserved at the old rate has passed; from here the new rate applies
    assert [(await call(proxy, CUSTOMERS))[0] for _ in range(50)] == [200] * 50


async def test_with_the_real_clock_a_request_that_did_not_wait_counts_no_delay(start_proxy, upstream):
    proxy = await start_proxy(config_for(upstream, {"rate_per_second": 1000, "burst": 100}))
    assert [(await call(proxy, CUSTOMERS))[0] for _ in range(5)] == [200] * 5
    await settled(proxy)
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.value("st_proxy_rate_limited_total", tenant=T1.tenant_id, outcome="delayed") == 0
    assert scrape.value("st_proxy_rate_limit_wait_seconds_count", tenant=T1.tenant_id) == 5
    assert scrape.value("st_proxy_rate_limit_wait_seconds_sum", tenant=T1.tenant_id) == 0
