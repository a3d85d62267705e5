"""The token lifecycle (docs/tokens.md, issue 3): TokenManager alone with a small gated fetcher for the pure rules,
and end to end through the proxy against the real simulator for everything a caller or the token endpoint can see."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest
from conftest import T1, T2, FakeClock, TokenGate, gated_simulator, sim_config  # noqa: F401 (test_tenants_endpoint imports them from here)
from prometheus_client.parser import text_string_to_metric_families

from st_proxy.config import Tenant, TokenConfig
from st_proxy.devtools.simulator import SimTenant
from st_proxy.errors import TokenRejected, TokenUnavailable
from st_proxy.upstream.token_client import Token, TokenClient, TokenRequestFailed
from st_proxy.upstream.tokens import BACKOFF_MAX, TokenManager


# -- helpers shared with test_replay.py and test_tenants_endpoint.py ---------------------------------------------------
def many_tenants(n: int, first: int = 2_000_000) -> list[SimTenant]:
    return [SimTenant(str(first + i), f"cid.t{i}", f"cs1.secret-{i}") for i in range(n)]


def sent_authorization(echo: dict) -> str:
    """The Authorization header the simulator received, from its echo resource."""
    return next(v for k, v in echo["headers"] if k.lower() == "authorization")


async def get(proxy, tenant: str = T1.tenant_id, resource: str = "customers", **kwargs):
    async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{tenant}/{resource}", **kwargs) as resp:
        return resp.status, resp.headers, await resp.read()


async def echo(proxy, tenant: str = T1.tenant_id) -> str:
    status, _, body = await get(proxy, tenant, "echo")
    assert status == 200, body
    return sent_authorization(json.loads(body))


async def metrics(proxy) -> dict[tuple[str, tuple], float]:
    async with proxy.session.get(proxy.admin_url + "/metrics", headers={"Accept-Encoding": "identity"}) as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- a gated fake fetcher for the pure TokenManager rules --------------------------------------------------------------
class FakeFetcher:
    def __init__(self, clock: FakeClock, lifetime: float = 900) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[BaseException] = []
        self._called = asyncio.Condition()

    async def called(self, n: int) -> None:
        """Until the fetcher has been called ``n`` times (a fetch runs in its own task, a few loop turns away)."""
        async with self._called:
            await asyncio.wait_for(self._called.wait_for(lambda: self.calls >= n), 10)

    async def fetch(self, tenant: Tenant) -> Token:
        async with self._called:
            self.calls += 1
            self._called.notify_all()
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        now = self.clock()
        return Token(f"token-{self.calls}", now, now + self.lifetime)


TENANT = sim_config(None).tenants[T1.tenant_id]


def manager(fetcher, clock, **settings) -> TokenManager:
    return TokenManager(fetcher, TokenConfig(**settings), clock=clock, rng=random.Random(3))


# -- validity, refresh-ahead, short-token caps -------------------------------------------------------------------------
async def test_a_900_second_token_refreshes_120_seconds_ahead_and_is_never_sent_in_its_last_30(clock):
    fetcher = FakeFetcher(clock)
    tokens = manager(fetcher, clock)
    first = await tokens.get(TENANT)
    assert not tokens.refresh_due(first, first.expires_at - 120.01) and tokens.refresh_due(
        first, first.expires_at - 120
    )
    clock.now = first.expires_at - 120.01
    assert await tokens.get(TENANT) is first
    assert tokens.status(TENANT).state == "valid"
    fetcher.gate.clear()
    clock.now = first.expires_at - 120  # one background refresh starts; callers keep the current token
    assert [await tokens.get(TENANT) for _ in range(5)] == [first] * 5
    await fetcher.called(2)
    assert tokens.status(TENANT).state == "refreshing"
    clock.now = first.expires_at - 30  # the refresh still hangs: the old token is no longer sent; callers wait
    waiter = asyncio.create_task(tokens.get(TENANT))
    await asyncio.sleep(0)
    assert not waiter.done()
    fetcher.gate.set()
    second = await waiter
    assert second is not first and fetcher.calls == 2


async def test_a_6_second_token_refreshes_at_half_its_lifetime_and_is_unusable_after_three_quarters(clock):
    fetcher = FakeFetcher(clock, lifetime=6)
    tokens = manager(fetcher, clock)
    first = await tokens.get(TENANT)
    assert not tokens.refresh_due(first, first.expires_at - 3.01) and tokens.refresh_due(first, first.expires_at - 3)
    assert tokens.usable(first, first.expires_at - 1.51) and not tokens.usable(first, first.expires_at - 1.5)
    fetcher.failures += [TokenRequestFailed("http_503", "down", rejected=False) for _ in range(2)]
    clock.now = first.expires_at - 3
    assert await tokens.get(TENANT) is first  # the refresh fails in the background; the token is still good
    await tokens.idle()
    assert await tokens.get(TENANT) is first and tokens.status(TENANT).state == "backing_off"
    clock.now = first.expires_at - 1.5  # a quarter of 6 s before expiry: never sent, with the endpoint failing
    with pytest.raises(TokenUnavailable):
        await tokens.get(TENANT)


async def test_a_background_refresh_refused_as_rejected_keeps_serving_the_still_valid_token(clock):
    fetcher = FakeFetcher(clock)
    tokens = manager(fetcher, clock, rejected_cooloff_seconds=120)
    first = await tokens.get(TENANT)
    fetcher.failures.append(TokenRequestFailed("invalid_client", "secret regenerated", rejected=True))
    clock.now = first.expires_at - 100
    assert await tokens.get(TENANT) is first
    await tokens.idle()
    assert tokens.status(TENANT).state == "rejected"
    assert [await tokens.get(TENANT) for _ in range(10)] == [first] * 10 and fetcher.calls == 2  # the cool-off holds
    clock.now = first.expires_at - 30
    with pytest.raises(TokenRejected) as refused:
        await tokens.get(TENANT)
    assert "invalid_client" in refused.value.detail and fetcher.calls == 2


async def test_invalidate_compares_by_identity_so_a_401_for_an_old_token_keeps_the_newer_one(clock):
    tokens = manager(FakeFetcher(clock), clock)
    old = await tokens.get(TENANT)
    assert tokens.invalidate(TENANT, old)
    clock.advance(31)
    new = await tokens.get(TENANT)
    assert new is not old
    assert not tokens.invalidate(TENANT, old)  # a late 401 for the old token
    assert not tokens.invalidate(TENANT, Token(old.access_token, old.issued_at, old.expires_at))  # equal, not same
    assert await tokens.get(TENANT) is new


async def test_a_second_invalidation_within_30_seconds_keeps_the_token_so_401s_cannot_hammer_the_endpoint(clock):
    fetcher = FakeFetcher(clock)
    tokens = manager(fetcher, clock)
    assert tokens.invalidate(TENANT, await tokens.get(TENANT))
    second = await tokens.get(TENANT)
    clock.advance(29)
    assert not tokens.invalidate(TENANT, second)
    assert await tokens.get(TENANT) is second and fetcher.calls == 2
    clock.advance(1)
    assert tokens.invalidate(TENANT, second)


async def test_cancelled_waiters_do_not_cancel_the_shared_fetch(clock):
    fetcher = FakeFetcher(clock)
    fetcher.gate.clear()
    tokens = manager(fetcher, clock)
    waiters = [asyncio.create_task(tokens.get(TENANT)) for _ in range(10)]
    await fetcher.called(1)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert all(w.cancelled() for w in waiters)
    assert tokens.status(TENANT).state == "refreshing"
    fetcher.gate.set()
    token = await tokens.get(TENANT)
    assert token.access_token == "token-1" and fetcher.calls == 1


async def test_retain_drops_a_rotated_entry_and_its_waiters_get_token_unavailable_not_a_cancellation(clock):
    fetcher = FakeFetcher(clock)
    fetcher.gate.clear()
    tokens = manager(fetcher, clock)
    waiter = asyncio.create_task(tokens.get(TENANT))
    await fetcher.called(1)
    rotated = sim_config(None, tenants=[SimTenant(T1.tenant_id, T1.client_id, "cs1.rotated")]).tenants[T1.tenant_id]
    assert tokens.retain([rotated]) == 1
    with pytest.raises(TokenUnavailable):
        await waiter
    fetcher.gate.set()
    assert (await tokens.get(rotated)).access_token == "token-2"


async def test_a_request_that_read_the_old_config_does_not_bring_retired_credentials_back_into_the_cache(clock):
    fetcher = FakeFetcher(clock)
    tokens = manager(fetcher, clock)
    await tokens.get(TENANT)
    rotated = sim_config(None, tenants=[SimTenant(T1.tenant_id, T1.client_id, "cs1.rotated")]).tenants[T1.tenant_id]
    assert tokens.retain([rotated]) == 1
    late = await tokens.get(TENANT)  # in flight across the reload: it finishes on the config it started with
    assert late.access_token == "token-2"
    assert tokens.retain([rotated]) == 0  # and nothing of the retired credentials was cached again


async def test_an_unexpected_fetcher_error_is_a_transient_failure_with_backoff(clock):
    fetcher = FakeFetcher(clock)
    fetcher.failures.append(RuntimeError("a bug"))
    tokens = manager(fetcher, clock)
    with pytest.raises(TokenUnavailable):
        await tokens.get(TENANT)
    assert tokens.status(TENANT).state == "backing_off"
    assert tokens.status(TENANT).last_error == "fetch_error"


async def test_transient_backoff_doubles_from_1_to_60_seconds_with_delays_between_half_and_all_of_the_step(clock):
    for seed in range(5):
        fetcher = FakeFetcher(clock)
        tokens = TokenManager(fetcher, TokenConfig(), clock=clock, rng=random.Random(seed))
        steps = [1, 2, 4, 8, 16, 32, 60, 60, 60]
        for n, step in enumerate(steps, 1):
            fetcher.failures.append(TokenRequestFailed("http_503", "down", rejected=False))
            with pytest.raises(TokenUnavailable):
                await tokens.get(TENANT)
            delay = tokens.entry(TENANT).retry_at - clock()
            assert step / 2 <= delay <= step and step <= BACKOFF_MAX
            assert fetcher.calls == n
            clock.advance(delay)  # nothing stops retrying for good: the next request after the delay tries again
        assert (await tokens.get(TENANT)).access_token == f"token-{len(steps) + 1}"


# -- single flight end to end ------------------------------------------------------------------------------------------
async def test_1000_concurrent_cold_requests_over_50_tenants_make_exactly_50_token_requests(
    make_simulator, start_proxy
):
    tenants = many_tenants(50)
    sim = await make_simulator(tenants=tenants)
    proxy = await start_proxy(sim_config(sim, tenants=tenants), prewarm=False)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000)) as session:

        async def one(i: int) -> int:
            tenant = tenants[i % 50].tenant_id
            async with session.get(f"{proxy.url}/crm/v2/tenant/{tenant}/customers/{i + 1}") as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(1000)))
    assert statuses == [200] * 1000
    assert sim.token_requests == 50
    assert set(sim.token_requests_by_client.values()) == {1}


async def test_refresh_starts_once_inside_the_window_and_no_request_waits_on_it(gated_simulator, start_proxy, clock):
    gate = TokenGate()
    sim = await gated_simulator(gate)
    proxy = await start_proxy(sim_config(sim), clock=clock, prewarm=False)
    first = await echo(proxy)
    gate.close()
    clock.advance(900 - 120 + 1)
    # The refresh is held at the token endpoint; every request meanwhile still goes out with the current token.
    sent = await asyncio.gather(*(echo(proxy) for _ in range(50)))
    assert set(sent) == {first}
    await gate.wait_for_arrivals(2)
    assert gate.arrived == 2 and gate.in_flight == 1
    assert proxy.runtime.tokens.status(proxy.runtime.holder.current.tenants[T1.tenant_id]).state == "refreshing"
    gate.open()
    await proxy.runtime.tokens.idle()
    second = await echo(proxy)
    assert second != first
    assert sim.token_requests == 2


async def test_callers_that_give_up_mid_fetch_leave_one_fetch_and_a_token_for_the_next_caller(
    gated_simulator, start_proxy
):
    gate = TokenGate()
    gate.close()
    sim = await gated_simulator(gate)
    proxy = await start_proxy(sim_config(sim), prewarm=False)
    callers = [asyncio.create_task(get(proxy)) for _ in range(20)]
    await gate.wait_for_arrivals(1)
    for caller in callers:
        caller.cancel()  # the client hangs up while the token request is still at the endpoint
    await asyncio.gather(*callers, return_exceptions=True)
    gate.open()
    status, _, _ = await get(proxy)
    assert status == 200
    assert sim.token_requests == 1 and gate.arrived == 1


async def test_callers_cancelled_mid_fetch_at_the_real_endpoint_still_leave_a_token(gated_simulator, clock):
    gate = TokenGate()
    gate.close()
    sim = await gated_simulator(gate)
    tenant = sim_config(sim).tenants[T1.tenant_id]
    async with aiohttp.ClientSession() as session:
        tokens = TokenManager(TokenClient(session, clock=clock), TokenConfig(), clock=clock)
        waiters = [asyncio.create_task(tokens.get(tenant)) for _ in range(10)]
        await gate.wait_for_arrivals(1)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        gate.open()
        token = await tokens.get(tenant)
        assert token.access_token == sim.issued_tokens[0]
        assert sim.token_requests == 1
        await tokens.close()


# -- failures ----------------------------------------------------------------------------------------------------------
async def test_a_token_request_slower_than_fetch_timeout_is_a_transient_failure_with_backoff(simulator, clock):
    simulator.token_delay = 0.5
    config = sim_config(simulator, tokens={"fetch_timeout_seconds": 0.05})
    tenant = config.tenants[T1.tenant_id]
    async with aiohttp.ClientSession() as session:
        tokens = TokenManager(TokenClient(session, clock=clock), config.tokens, clock=clock, rng=random.Random(1))
        with pytest.raises(TokenUnavailable) as refused:
            await tokens.get(tenant)
        assert "timeout" in refused.value.detail
        status = tokens.status(tenant)
        assert (status.state, status.last_error) == ("backing_off", "timeout")
        assert 0.5 <= tokens.entry(tenant).retry_at - clock() <= 1
        with pytest.raises(TokenUnavailable):  # during the backoff: refused without a new request
            await tokens.get(tenant)
        assert simulator.token_requests == 1


async def test_a_flapping_endpoint_is_retried_on_the_backoff_schedule_without_extra_requests(simulator, clock):
    simulator.fail_tokens(503, times=2)
    tenant = sim_config(simulator).tenants[T1.tenant_id]
    async with aiohttp.ClientSession() as session:
        tokens = TokenManager(TokenClient(session, clock=clock), TokenConfig(), clock=clock, rng=random.Random(42))
        delays = []
        for attempt, step in ((1, 1), (2, 2)):
            with pytest.raises(TokenUnavailable) as refused:
                await tokens.get(tenant)
            delay = tokens.entry(tenant).retry_at - clock()
            assert step / 2 <= delay <= step
            assert refused.value.retry_after >= delay
            delays.append(delay)
            clock.advance(delay - 0.001)
            for _ in range(20):  # load before retry_at: refused at once, no token request
                with pytest.raises(TokenUnavailable):
                    await tokens.get(tenant)
            assert simulator.token_requests == attempt
            clock.advance(0.001)
        assert (await tokens.get(tenant)).access_token == simulator.issued_tokens[0]
        assert simulator.token_requests == 3
        assert tokens.status(tenant).state == "valid"


async def test_a_retry_after_longer_than_the_step_is_honoured_and_a_shorter_one_is_not(simulator, clock):
    tenant = sim_config(simulator).tenants[T1.tenant_id]
    async with aiohttp.ClientSession() as session:
        tokens = TokenManager(TokenClient(session, clock=clock), TokenConfig(), clock=clock, rng=random.Random(5))
        simulator.fail_tokens(429, {"error": "slow_down"}, headers={"Retry-After": "7"}, times=1)
        with pytest.raises(TokenUnavailable) as refused:
            await tokens.get(tenant)
        assert tokens.entry(tenant).retry_at - clock() == 7
        assert refused.value.retry_after == 7
        clock.advance(6.9)
        with pytest.raises(TokenUnavailable):
            await tokens.get(tenant)
        assert simulator.token_requests == 1
        clock.advance(0.1)
        simulator.fail_tokens(503, headers={"Retry-After": "0"}, times=1)
        with pytest.raises(TokenUnavailable):
            await tokens.get(tenant)
        assert 1 <= tokens.entry(tenant).retry_at - clock() <= 2  # the second step, not the server's 0
        clock.advance(2)
        await tokens.get(tenant)
        assert simulator.token_requests == 3


async def test_rejected_credentials_answer_502_at_once_and_ask_once_per_cooloff(simulator, start_proxy, clock):
    config = sim_config(simulator, tenants=[SimTenant(T1.tenant_id, T1.client_id, "cs1.wrong")])
    proxy = await start_proxy(config, clock=clock, prewarm=False)

    async def burst(n: int) -> None:
        answers = await asyncio.gather(*(get(proxy) for _ in range(n)))
        for status, headers, body in answers:
            assert status == 502 and headers["X-ST-Proxy-Error"] == "token_rejected"
            assert "invalid_client" in json.loads(body)["detail"]

    await burst(200)
    assert simulator.token_requests == 1
    clock.advance(59.9)
    await burst(50)
    assert simulator.token_requests == 1
    clock.advance(0.1)
    await burst(200)
    assert simulator.token_requests == 2


async def test_a_failing_endpoint_keeps_a_valid_token_flowing_until_expiry_minus_skew_then_answers_503(
    make_simulator, start_proxy, clock
):
    sim = await make_simulator(clock=clock)  # the simulator judges expiry on the same clock
    proxy = await start_proxy(sim_config(sim), clock=clock, prewarm=False)
    first = await echo(proxy)
    sim.fail_tokens(503)
    clock.advance(781)  # inside the refresh window: every refresh from here on fails
    fetched_at = clock() - 781
    while clock() < fetched_at + 870 - 1:
        assert await echo(proxy) == first
        clock.advance(1)
    assert sim.token_requests > 2  # the backoff kept retrying in the meantime
    clock.advance(fetched_at + 870 - clock() - 0.001)
    assert await echo(proxy) == first  # the last moment it may be sent
    api_before = sim.api_requests
    clock.advance(0.001)  # expires_at - skew: never sent again, whatever the endpoint does
    for _ in range(20):
        status, headers, body = await get(proxy)
        assert status == 503 and headers["X-ST-Proxy-Error"] == "token_unavailable"
        assert int(headers["Retry-After"]) >= 1
    assert sim.api_requests == api_before  # the simulator never saw the expired token
    sim.clear_failures()
    clock.advance(BACKOFF_MAX + 1)
    assert await echo(proxy) != first


async def test_a_rotated_secret_never_reuses_the_old_token_and_retain_drops_the_old_entry(simulator, clock):
    old = sim_config(simulator).tenants[T1.tenant_id]
    new = sim_config(simulator, tenants=[SimTenant(T1.tenant_id, T1.client_id, "cs1.rotated"), T2]).tenants
    assert old.credentials_key() != new[T1.tenant_id].credentials_key()
    async with aiohttp.ClientSession() as session:
        tokens = TokenManager(TokenClient(session, clock=clock), TokenConfig(), clock=clock)
        before = await tokens.get(old)
        simulator.set_secret(T1.tenant_id, "cs1.rotated")
        after = await tokens.get(new[T1.tenant_id])
        assert after is not before and after.access_token != before.access_token
        assert simulator.token_requests == 2
        assert tokens.retain(new.values()) == 1
        assert tokens.status(old).state == "none" and tokens.status(new[T1.tenant_id]).state == "valid"


async def test_a_reload_with_a_rotated_secret_sends_a_new_token_on_the_next_request(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    before = await echo(proxy)
    simulator.set_secret(T1.tenant_id, "cs1.rotated")
    rotated = sim_config(simulator, tenants=[SimTenant(T1.tenant_id, T1.client_id, "cs1.rotated"), T2])
    proxy.runtime.holder.swap(rotated)
    proxy.runtime.tokens.retain(rotated.tenants.values())
    after = await echo(proxy)
    assert after != before
    assert simulator.token_requests == 2


# -- logs and metrics --------------------------------------------------------------------------------------------------
async def test_a_failing_tenant_logs_once_per_state_change_not_once_per_request(
    simulator, start_proxy, clock, captured_logs
):
    simulator.fail_tokens(503)
    proxy = await start_proxy(sim_config(simulator), clock=clock, prewarm=False)
    for i in range(100):
        status, _, _ = await get(proxy)
        assert status == 503
        if i % 10 == 9:
            clock.advance(61)  # past any backoff: the next request makes a new attempt
    assert simulator.token_requests == 10
    simulator.clear_failures()
    clock.advance(61)
    assert (await get(proxy))[0] == 200
    lines = [json.loads(line) for line in captured_logs().splitlines()]
    events = [line["event"] for line in lines if str(line.get("event", "")).startswith("token_")]
    assert events == ["token_backing_off", "token_recovered"]
    assert T1.client_secret not in captured_logs()


async def test_token_metrics_count_fetches_by_outcome_and_show_seconds_to_expiry(simulator, start_proxy, clock):
    config = sim_config(simulator, tenants=[T1, SimTenant(T2.tenant_id, T2.client_id, "cs1.wrong")])
    proxy = await start_proxy(config, clock=clock, prewarm=False)
    await get(proxy, T1.tenant_id)
    await get(proxy, T2.tenant_id)
    simulator.fail_tokens(500, times=1)
    clock.advance(900 - 120)  # T1's background refresh fails once
    await get(proxy, T1.tenant_id)
    await proxy.runtime.tokens.idle()
    m = await metrics(proxy)

    def fetches(tenant: str, outcome: str) -> float:
        return m[("st_proxy_token_fetches_total", (("outcome", outcome), ("tenant", tenant)))]

    assert [fetches(T1.tenant_id, o) for o in ("success", "rejected", "error")] == [1, 0, 1]
    assert [fetches(T2.tenant_id, o) for o in ("success", "rejected", "error")] == [0, 1, 0]
    assert m[("st_proxy_token_fetch_duration_seconds_count", (("tenant", T1.tenant_id),))] == 2
    assert m[("st_proxy_token_fetch_duration_seconds_count", (("tenant", T2.tenant_id),))] == 1
    assert m[("st_proxy_token_expires_in_seconds", (("tenant", T1.tenant_id),))] == 120
    assert m[("st_proxy_token_expires_in_seconds", (("tenant", T2.tenant_id),))] == 0
