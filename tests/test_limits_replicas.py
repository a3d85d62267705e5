"""Three real `st-proxy serve` processes sharing one Redis (docs/limits.md): the upstream's arrivals per second stay
within the one budget, a 429 seen by one holds the tenant on the others, and with Redis stopped in the middle of the
load no caller sees a 5xx, each process paces alone at its share, and all return to Redis when it is back.

Assertions are on counts per second at the upstream, with a tolerance derived from the burst (GCRA lets at most
rate + burst through in any one second; another burst allows for requests crossing a bucket boundary on their way),
never on how long anything took. Load loops are bounded in time and count.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from conftest import T1, T2
from redis_server import PASSWORD, redis_server  # noqa: F401 (fixture)
from serve_process import ServeProcess, poll_until, write_config
from test_limits_pacing import CUSTOMERS, upstream  # noqa: F401 (fixture)
from test_metrics import Scrape

from st_proxy.devtools.simulator import DEMO_APP_KEY

RATE, BURST, MAX_WAIT = 30, 6, 1
REPLICAS = 3
FRACTION = 1 / REPLICAS
CALLERS_PER_PROCESS = 8
MAX_CALLS_PER_CALLER = 400  # bounds the loop whatever the speed


@pytest.fixture
async def replicas(tmp_path, upstream, redis_server) -> AsyncIterator[list[ServeProcess]]:
    (tmp_path / "redis_password").write_text(PASSWORD + "\n")
    config = write_config(
        tmp_path,
        auth_url=upstream.auth_url,
        api_url=upstream.base_url,
        tenants=(T1, T2),
        app_key=DEMO_APP_KEY,
        limits={"rate_per_second": RATE, "burst": BURST, "max_wait_seconds": MAX_WAIT, "retry_throttled": False},
        state={
            "redis_url": redis_server.url,
            "password": {"file": str(tmp_path / "redis_password")},
            "timeout_ms": 500,
            "fallback_rate_fraction": FRACTION,
        },
    )
    procs = await asyncio.gather(*(ServeProcess.start(config) for _ in range(REPLICAS)))
    try:
        for proc in procs:
            await proc.wait_event("ready")
        yield list(procs)
    finally:
        for proc in procs:
            await proc.close()
        for proc in procs:
            assert PASSWORD not in proc.output()


async def load(procs: list[ServeProcess], seconds: float) -> collections.Counter[int]:
    """Every process gets CALLERS_PER_PROCESS callers asking as fast as they are answered, for ``seconds``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    statuses: collections.Counter[int] = collections.Counter()
    timeout = aiohttp.ClientTimeout(total=20)

    async def caller(session: aiohttp.ClientSession, proc: ServeProcess, name: str) -> None:
        for _ in range(MAX_CALLS_PER_CALLER):
            if loop.time() >= end:
                return
            async with session.get(proc.url + CUSTOMERS, headers={"X-Caller": name}, timeout=timeout) as resp:
                await resp.read()
                statuses[resp.status] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(caller(session, proc, f"p{i}-{c}") for i, proc in enumerate(procs) for c in range(CALLERS_PER_PROCESS))
        )
    return statuses


async def scrape(proc: ServeProcess) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(proc.admin_url + "/metrics") as resp:
        return Scrape(await resp.text())


def assert_within(counts: list[int], rate: float, burst: int, what: str) -> None:
    limit = rate + 2 * burst
    assert counts, f"{what}: no whole second of load"
    assert max(counts) <= limit, f"{what}: arrivals per second {counts}, at most {limit} allowed"


async def test_three_replicas_keep_the_upstream_within_one_budget(replicas, upstream):
    started = time.monotonic()
    statuses = await load(replicas, 3.5)
    finished = time.monotonic()
    counts = upstream.per_second(started, finished)
    print(f"arrivals per second at the upstream, 3 replicas sharing Redis: {counts}; callers got {dict(statuses)}")
    assert_within(counts, RATE, BURST, "three replicas")
    assert set(statuses) <= {200, 429}  # paced or refused by the proxy, never a 5xx
    for i in range(REPLICAS):  # every replica took part
        assert any(a.caller.startswith(f"p{i}-") for a in upstream.arrivals)
    delayed = [
        (await scrape(p)).value("st_proxy_rate_limited_total", tenant=T1.tenant_id, outcome="delayed") for p in replicas
    ]
    assert sum(delayed) > 0  # the pacing was engaged, not idle


async def test_a_429_seen_by_one_replica_holds_the_tenant_on_the_others(replicas, upstream):
    upstream.queued.append((429, {"Retry-After": "20"}, b"slow down"))
    async with aiohttp.ClientSession() as session:
        async with session.get(replicas[0].url + CUSTOMERS) as resp:
            assert (resp.status, await resp.read()) == (429, b"slow down")
        for proc in replicas[1:]:
            async with session.get(proc.url + CUSTOMERS) as resp:
                assert (resp.status, resp.headers["X-ST-Proxy-Error"]) == (429, "rate_limited")
            async with session.get(proc.url + f"/crm/v2/tenant/{T2.tenant_id}/customers") as resp:
                assert resp.status == 200  # only that tenant is held
    assert [a.path for a in upstream.arrivals].count(CUSTOMERS) == 1
    throttled = (await scrape(replicas[0])).value("st_proxy_upstream_throttled_total", tenant=T1.tenant_id)
    assert throttled == 1


async def test_redis_stopped_mid_load_fails_no_caller_each_replica_paces_alone_and_all_return(
    replicas, upstream, redis_server
):
    first = await load(replicas, 1.5)
    redis_server.stop()
    stopped = time.monotonic()
    during = await load(replicas, 3 + MAX_WAIT)
    after_stop = time.monotonic()
    for proc in replicas:
        assert (await scrape(proc)).value("st_proxy_state_backend_up") == 0
        assert len(proc.with_event("state_backend_down")) == 1
    # Slots reserved in Redis before it went away are still being used for up to max_wait_seconds: the per-process
    # share is checked from then on.
    since = stopped + MAX_WAIT
    share_counts = {i: upstream.per_second(since, after_stop, f"p{i}-") for i in range(REPLICAS)}
    print(f"arrivals per second per replica while Redis was away: {share_counts}")
    share_burst = max(1, int(BURST * FRACTION))
    for i, counts in share_counts.items():
        assert_within(counts, RATE * FRACTION, share_burst, f"replica {i} alone")
    redis_server.start()

    async def all_up() -> bool:
        return all([(await scrape(p)).value("st_proxy_state_backend_up") == 1 for p in replicas])

    await poll_until(all_up, what="every replica back on Redis")
    back = time.monotonic()
    last = await load(replicas, 2 + MAX_WAIT)
    # As at the switch away: slots reserved alone are still used for up to max_wait_seconds after the return.
    counts = upstream.per_second(back + MAX_WAIT, time.monotonic())
    print(f"arrivals per second after Redis came back: {counts}")
    assert_within(counts, RATE, BURST, "back on Redis")
    for statuses in (first, during, last):
        assert set(statuses) <= {200, 429}, statuses
    assert redis_server.client().keys("*")


async def test_in_a_served_process_a_caller_that_hangs_up_while_waiting_is_never_sent(tmp_path, upstream):
    """`st-proxy serve` does not cancel a handler when its caller leaves (aiohttp's default): the waiting request
    must notice by itself when its slot comes, and not send."""
    config = write_config(
        tmp_path,
        auth_url=upstream.auth_url,
        api_url=upstream.base_url,
        tenants=(T1,),
        app_key=DEMO_APP_KEY,
        limits={"rate_per_second": 0.5, "burst": 1, "max_wait_seconds": 5},
    )
    proc = await ServeProcess.start(config)
    try:
        await proc.wait_event("ready")
        async with aiohttp.ClientSession() as session:
            async with session.get(proc.url + CUSTOMERS) as resp:
                assert resp.status == 200
            with pytest.raises(TimeoutError):  # its slot is 2 s away; the caller gives up first
                async with session.get(proc.url + CUSTOMERS, timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
                    await resp.read()

        async def gone_logged() -> bool:
            return any(e.get("error") == "caller_disconnected" for e in proc.events)

        await poll_until(gone_logged, what="the hang-up noticed when the slot came")
        assert len(upstream.arrivals) == 1
    finally:
        await proc.close()
