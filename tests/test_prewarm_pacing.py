"""Prewarm pacing and the readiness bound (docs/scaling.md): token requests at most ``prewarm_rate_per_second``
across start-up and reloads, readiness after at most ``prewarm_ready_seconds``, and a request for a tenant not yet
warmed fetching at once, ahead of the queue, with prewarm yielding the slot it used.

Time is injected: ``ManualTime`` is the clock and the sleep, and only the test moves it, so nothing here waits for
real time and every moment is exact.
"""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from conftest import FakeClock, sim_config
from test_tenants_endpoint import admin
from test_tokens import get, many_tenants

from st_proxy.config import Tenant, TokenConfig
from st_proxy.upstream.pacing import Pacer
from st_proxy.upstream.token_client import Token
from st_proxy.upstream.tokens import TokenManager


class ManualTime:
    """An injected clock and ``sleep``: a sleeper wakes only when the test moves the clock past its deadline."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Condition()

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.clock() + seconds, future))
        async with self._changed:
            self._changed.notify_all()
        await future

    async def sleepers(self, n: int = 1) -> None:
        """Until at least ``n`` tasks are asleep."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self._sleepers) >= n), 10)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._wake()

    def to_next_deadline(self) -> None:
        self.clock.now = max(self.clock.now, min(deadline for deadline, _ in self._sleepers))
        self._wake()

    def _wake(self) -> None:
        due = [(d, f) for d, f in self._sleepers if d <= self.clock.now + 1e-9]
        self._sleepers = [(d, f) for d, f in self._sleepers if d > self.clock.now + 1e-9]
        for _, future in due:
            future.set_result(None)


class RecordingFetcher:
    """Answers at once, recording which tenant asked and the injected time it asked at."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[tuple[str, float]] = []

    async def fetch(self, tenant: Tenant) -> Token:
        now = self.clock()
        self.calls.append((tenant.tenant_id, now))
        return Token(f"token-{len(self.calls)}", now, now + 900)


def tenants(n: int) -> list[Tenant]:
    return list(sim_config(None, tenants=many_tenants(n)).tenants.values())


def manager(fetcher: RecordingFetcher, time: ManualTime, **settings) -> TokenManager:
    return TokenManager(fetcher, TokenConfig(**settings), clock=time.clock, sleep=time.sleep, rng=random.Random(1))


async def drive(time: ManualTime, work: asyncio.Future) -> None:
    """Move the clock from deadline to deadline until ``work`` is done, letting woken tasks run between moves."""
    for _ in range(1000):  # bounded: a pacing bug fails the test instead of hanging it
        for _ in range(50):
            await asyncio.sleep(0)  # loop turns, not time: the woken workers take their turn or sleep again
        if work.done():
            return await work
        await time.sleepers(1)
        time.to_next_deadline()
    raise AssertionError("prewarm did not finish")


def gaps(times: list[float]) -> list[float]:
    times = sorted(times)
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


async def test_prewarm_spaces_token_requests_at_the_rate_whatever_the_concurrency(clock):
    time = ManualTime(clock)
    fetcher = RecordingFetcher(clock)
    tokens = manager(fetcher, time, prewarm_rate_per_second=4, prewarm_concurrency=8)
    start = clock()
    await drive(time, asyncio.ensure_future(tokens.prewarm(tenants(10))))
    assert sorted(t for t, _ in fetcher.calls) == sorted(t.tenant_id for t in tenants(10))
    assert gaps([at for _, at in fetcher.calls]) == [0.25] * 9  # evenly spaced: never a burst, never slower
    assert fetcher.calls[0][1] == start  # the first goes at once


async def test_a_reload_prewarm_shares_the_rate_with_a_start_up_prewarm_still_running(clock):
    time = ManualTime(clock)
    fetcher = RecordingFetcher(clock)
    tokens = manager(fetcher, time, prewarm_rate_per_second=2, prewarm_concurrency=4)
    everyone = tenants(8)
    both = asyncio.gather(tokens.prewarm(everyone[:5]), tokens.prewarm(everyone[5:]))
    await drive(time, both)
    assert len(fetcher.calls) == 8
    assert min(gaps([at for _, at in fetcher.calls])) >= 0.5


async def test_on_demand_fetches_go_at_once_and_push_prewarm_back_by_one_slot_each(clock):
    time = ManualTime(clock)
    fetcher = RecordingFetcher(clock)
    tokens = manager(fetcher, time, prewarm_rate_per_second=1, prewarm_concurrency=1)
    a, b, c, d = tenants(4)
    start = clock()
    warm = asyncio.ensure_future(tokens.prewarm([a, b, c, d]))
    await time.sleepers(1)  # a fetched at once; prewarm waits for the slot at start + 1
    assert fetcher.calls == [(a.tenant_id, start)]
    await tokens.get(d)  # a request for d: no wait, although the clock has not moved
    await tokens.get(c)
    assert fetcher.calls[1:] == [(d.tenant_id, start), (c.tenant_id, start)]
    # The two on-demand fetches used the slots at start + 1 and start + 2: prewarm's next turn is start + 3.
    await drive(time, warm)
    assert fetcher.calls[3:] == [(b.tenant_id, start + 3)]  # and c and d, already warm, cost no slot and no request


async def test_a_tenant_removed_by_a_reload_before_its_turn_is_never_fetched(clock):
    time = ManualTime(clock)
    fetcher = RecordingFetcher(clock)
    tokens = manager(fetcher, time, prewarm_rate_per_second=1, prewarm_concurrency=1)
    a, b, c = tenants(3)
    warm = asyncio.ensure_future(tokens.prewarm([a, b, c]))
    await time.sleepers(1)
    tokens.retain([a, c])  # a reload removed b while start-up prewarm still runs
    await drive(time, warm)
    assert [t for t, _ in fetcher.calls] == [a.tenant_id, c.tenant_id]
    assert tokens.status(b).state == "none"


async def test_pacer_books_a_slot_for_each_on_demand_request_and_turns_wait_behind_them(clock):
    time = ManualTime(clock)
    pacer = Pacer(10, clock=clock, sleep=time.sleep)
    start = clock()
    await pacer.turn()  # free: nothing booked yet
    for _ in range(3):
        pacer.take()  # never waits
    turn = asyncio.ensure_future(pacer.turn())
    await time.sleepers(1)
    time.advance(0.3)  # start + 0.3: the three on-demand slots are start + 0.1, 0.2, 0.3, so not yet
    await time.sleepers(1)
    assert not turn.done()
    time.advance(0.1)
    await turn
    assert clock() - start == pytest.approx(0.4, abs=1e-6)


# -- end to end: a real proxy against the simulator ---------------------------------------------------------------------
async def test_a_request_for_a_tenant_not_yet_warmed_is_answered_at_once_while_prewarm_waits_for_its_turn(
    make_simulator, start_proxy, clock
):
    first, second, third, last = many_tenants(4)
    sim = await make_simulator(tenants=[first, second, third, last])
    time = ManualTime(clock)
    config = sim_config(
        sim, tenants=[first, second, third, last], tokens={"prewarm_rate_per_second": 1, "prewarm_concurrency": 1}
    )
    proxy = await start_proxy(config, clock=clock, sleep=time.sleep)
    configured = proxy.runtime.holder.current.tenants
    await proxy.runtime.tokens.wait_attempted([configured[first.tenant_id]])
    await time.sleepers(1)  # prewarm waits for its next slot, one (injected) second away

    status, _, _ = await get(proxy, last.tenant_id)  # the clock has not moved: nothing in this request waited
    assert status == 200
    assert sim.token_requests_by_client[last.client_id] == 1
    assert sim.token_requests_by_client[second.client_id] == 0  # it jumped the queue

    time.advance(1)  # the slot prewarm waited for was used by that request: it waits one more
    await time.sleepers(1)
    assert sim.token_requests_by_client[second.client_id] == 0
    time.advance(1)
    await proxy.runtime.tokens.wait_attempted([configured[second.tenant_id]])
    await time.sleepers(1)
    time.advance(1)
    await proxy.runtime.tokens.wait_attempted(configured.values())
    assert sim.token_requests == 4  # every tenant once: prewarm skipped the one already warm


async def test_readyz_turns_200_after_prewarm_ready_seconds_and_prewarm_goes_on_in_the_background(
    make_simulator, start_proxy, clock
):
    five = many_tenants(5)
    sim = await make_simulator(tenants=five)
    time = ManualTime(clock)
    config = sim_config(
        sim,
        tenants=five,
        tokens={"prewarm_rate_per_second": 1, "prewarm_concurrency": 2, "prewarm_ready_seconds": 2.5},
    )
    proxy = await start_proxy(config, clock=clock, sleep=time.sleep)
    tokens, configured = proxy.runtime.tokens, proxy.runtime.holder.current.tenants
    await tokens.wait_attempted([configured[five[0].tenant_id]])
    status, body = await admin(proxy, "/readyz")
    assert status == 503 and body["waiting_for"] == [t.tenant_id for t in five[1:]]

    for n in (1, 2):  # one more tenant each (injected) second; the bound is not reached yet
        await time.sleepers(1)
        time.advance(1)
        await tokens.wait_attempted([configured[five[n].tenant_id]])
        assert (await admin(proxy, "/readyz"))[0] == 503
    time.advance(0.5)  # 2.5 s since start: the bound
    assert await admin(proxy, "/readyz") == (200, {"status": "ready"})
    assert proxy.runtime.pending_tenants() == [five[3].tenant_id, five[4].tenant_id]
    assert sim.token_requests == 3

    await time.sleepers(1)
    time.advance(1)
    await time.sleepers(1)
    time.advance(1)
    await tokens.wait_attempted(configured.values())  # the rest were warmed in the background
    assert sim.token_requests == 5
    assert (await admin(proxy, "/readyz"))[0] == 200  # a latch: it stays ready
