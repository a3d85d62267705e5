"""Budgets and holds shared through a real Redis (Debian's redis-server on loopback), between two proxies in this
process; Redis taken away and brought back. Rates are slow enough (one request per several seconds) that a slow
machine cannot turn a refusal into a pass: nothing here depends on how fast a request is."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import T1
from recording_upstream import RecordingUpstream
from redis_server import PASSWORD, redis_server, tls_redis_server  # noqa: F401 (fixtures)
from test_limits_pacing import CUSTOMERS, call, config_for, upstream  # noqa: F401 (fixture)
from test_metrics import Scrape, scrape_text

from st_proxy.config import from_mapping


def shared_config(
    up: RecordingUpstream, server, tmp_path, limits: dict[str, Any], password: str = PASSWORD, **state: Any
):
    (tmp_path / "redis_password").write_text(password + "\n")
    base = config_for(up, None)
    raw: dict[str, Any] = {
        "app_key": {"value": base.app_key.reveal()},
        "environments": {"sim": {"auth_url": up.auth_url, "api_url": up.base_url}},
        "tenants": {
            t.tenant_id: {
                "environment": "sim",
                "client_id": t.client_id,
                "client_secret": {"value": t.client_secret.reveal()},
            }
            for t in base.tenants.values()
        },
        "limits": limits,
        "state": {
            "redis_url": server.url,
            "password": {"file": str(tmp_path / "redis_password")},
            "timeout_ms": 500,  # generous: a loaded CI machine must not fall back by accident
            **state,
        },
    }
    return from_mapping(raw, {})


async def until_async(check, what: str, rounds: int = 400) -> None:
    for _ in range(rounds):
        if await check():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{what} did not happen")


async def backend_up(proxy) -> float:
    return Scrape(await scrape_text(proxy)).value("st_proxy_state_backend_up")


async def test_two_proxies_sharing_redis_share_one_budget(start_proxy, upstream, redis_server, tmp_path):
    config = shared_config(
        upstream, redis_server, tmp_path, {"rate_per_second": 0.2, "burst": 1, "max_wait_seconds": 0}
    )
    first, second = await start_proxy(config), await start_proxy(config)
    assert (await call(first, CUSTOMERS))[0] == 200
    status, headers, _ = await call(second, CUSTOMERS)  # the next slot is 5 s away, and the other proxy took it
    assert (status, headers["X-ST-Proxy-Error"]) == (429, "rate_limited")
    assert int(headers["Retry-After"]) >= 1
    assert len(upstream.arrivals) == 1
    assert await backend_up(second) == 1


async def test_a_429_seen_by_one_proxy_holds_the_tenant_on_the_other(start_proxy, upstream, redis_server, tmp_path):
    config = shared_config(
        upstream, redis_server, tmp_path, {"rate_per_second": 50, "max_wait_seconds": 1, "retry_throttled": False}
    )
    first, second = await start_proxy(config), await start_proxy(config)
    upstream.queued.append((429, {"Retry-After": "30"}, b"upstream says no"))
    assert (await call(first, CUSTOMERS))[:3:2] == (429, b"upstream says no")
    status, headers, body = await call(second, CUSTOMERS)
    assert (status, headers["X-ST-Proxy-Error"]) == (429, "rate_limited")
    assert json.loads(body)["tenant"] == T1.tenant_id
    assert len(upstream.arrivals) == 1  # the other proxy never sent into the hold


async def test_redis_holds_no_token_or_secret_only_numbers_under_the_prefix(
    start_proxy, upstream, redis_server, tmp_path
):
    config = shared_config(upstream, redis_server, tmp_path, {"rate_per_second": 50}, key_prefix="test-prefix:")
    proxy = await start_proxy(config)
    upstream.queued.append((429, {"Retry-After": "5"}, b""))
    for path in (CUSTOMERS, "/reporting/v2/tenant/1000001/report-category/c/reports/7/data"):
        await call(proxy, path, "POST")
    client = redis_server.client()
    keys = client.keys("*")
    assert keys and all(k.startswith(b"test-prefix:") for k in keys)
    dump = b" ".join(keys + [v for k in keys for v in client.hgetall(k).values()])
    for forbidden in (b"upstream-token", config.app_key.reveal().encode(), PASSWORD.encode()):
        assert forbidden not in dump
    for key in keys:
        assert all(v.isdigit() for v in client.hgetall(key).values())
        assert client.pttl(key) > 0  # they expire once they hold nothing


async def test_redis_going_away_fails_no_request_and_the_proxy_paces_alone_until_it_is_back(
    start_proxy, upstream, redis_server, tmp_path, captured_logs
):
    config = shared_config(
        upstream, redis_server, tmp_path, {"rate_per_second": 100, "burst": 10}, fallback_rate_fraction=0.5
    )
    proxy = await start_proxy(config)
    assert (await call(proxy, CUSTOMERS))[0] == 200
    redis_server.stop()
    statuses = [(await call(proxy, CUSTOMERS))[0] for _ in range(20)]
    assert statuses == [200] * 20
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.value("st_proxy_state_backend_up") == 0
    assert scrape.value("st_proxy_state_errors_total") >= 1
    redis_server.start()
    await until_async(lambda: _is_up(proxy), "the probe finding Redis again")
    assert (await call(proxy, CUSTOMERS))[0] == 200
    assert redis_server.client().keys("*")  # back on the shared budget
    events = [json.loads(line).get("event") for line in captured_logs().splitlines() if line.startswith("{")]
    assert events.count("state_backend_down") == 1  # logged once, not per request
    assert events.count("state_backend_up") == 1
    assert PASSWORD not in captured_logs()


async def _is_up(proxy) -> bool:
    return await backend_up(proxy) == 1


async def test_a_proxy_started_while_redis_is_down_serves_and_joins_when_it_comes(
    start_proxy, upstream, redis_server, tmp_path
):
    config = shared_config(upstream, redis_server, tmp_path, {"rate_per_second": 100})
    redis_server.stop()
    proxy = await start_proxy(config)
    assert (await call(proxy, CUSTOMERS))[0] == 200
    assert await backend_up(proxy) == 0
    redis_server.start()
    await until_async(lambda: _is_up(proxy), "the probe finding Redis")


async def test_a_wrong_redis_password_means_pacing_alone_never_a_failed_request(
    start_proxy, upstream, redis_server, tmp_path, captured_logs
):
    config = shared_config(upstream, redis_server, tmp_path, {"rate_per_second": 100}, password="wrong-pw-5150")
    proxy = await start_proxy(config)
    assert (await call(proxy, CUSTOMERS))[0] == 200
    assert await backend_up(proxy) == 0
    assert "wrong-pw-5150" not in captured_logs()


async def test_a_redis_slower_than_timeout_ms_is_treated_as_away_and_adds_no_wait_to_requests(
    start_proxy, upstream, redis_server, tmp_path
):
    config = shared_config(upstream, redis_server, tmp_path, {"rate_per_second": 100}, timeout_ms=100)
    proxy = await start_proxy(config)
    assert await backend_up(proxy) == 1
    stall = asyncio.create_task(asyncio.to_thread(redis_server.client().execute_command, "DEBUG", "SLEEP", "2"))
    await asyncio.sleep(0.2)  # let the stall begin (DEBUG SLEEP blocks the whole server)
    statuses = [(await call(proxy, CUSTOMERS))[0] for _ in range(30)]
    assert statuses == [200] * 30
    scrape = Scrape(await scrape_text(proxy))
    assert scrape.value("st_proxy_state_backend_up") == 0
    # The request path asked once and then stopped asking: the other errors are the background probe's (one a second).
    assert scrape.value("st_proxy_state_errors_total") < 30
    await stall
    await until_async(lambda: _is_up(proxy), "the probe finding Redis answering again")


async def test_a_caller_leaving_while_waiting_gives_its_slot_back_in_redis(
    start_proxy, upstream, redis_server, tmp_path
):
    config = shared_config(upstream, redis_server, tmp_path, {"rate_per_second": 0.2, "burst": 1})
    proxy = await start_proxy(config)
    client = redis_server.client()
    assert (await call(proxy, CUSTOMERS))[0] == 200
    [key] = client.keys("*")
    first = client.hget(key, "t")
    leaving = asyncio.create_task(call(proxy, CUSTOMERS))

    async def reserved() -> bool:
        return client.hget(key, "t") != first

    await until_async(reserved, "the second request reserving its slot")
    leaving.cancel()

    async def given_back() -> bool:
        return client.hget(key, "t") == first

    await until_async(given_back, "the slot given back")
    assert len(upstream.arrivals) == 1


async def test_rediss_with_the_state_ca_file_shares_the_budget_over_tls(
    start_proxy, upstream, tls_redis_server, tmp_path
):
    ca = tls_redis_server.tls[0]
    config = shared_config(
        upstream,
        tls_redis_server,
        tmp_path,
        {"rate_per_second": 0.2, "burst": 1, "max_wait_seconds": 0},
        ca_file=str(ca),
    )
    first, second = await start_proxy(config), await start_proxy(config)
    assert (await call(first, CUSTOMERS))[0] == 200
    assert (await call(second, CUSTOMERS))[0] == 429  # one budget, through Redis over TLS
    assert await backend_up(second) == 1
    assert tls_redis_server.client().keys("*")


async def test_rediss_without_a_trusted_ca_is_never_used_and_fails_no_request(
    start_proxy, upstream, tls_redis_server, tmp_path
):
    config = shared_config(upstream, tls_redis_server, tmp_path, {"rate_per_second": 100})
    proxy = await start_proxy(config)  # the test CA is in no system trust store: the certificate is refused
    assert (await call(proxy, CUSTOMERS))[0] == 200
    assert await backend_up(proxy) == 0
    assert tls_redis_server.client().keys("*") == []
