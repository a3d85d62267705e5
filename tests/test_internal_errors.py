"""An unexpected exception inside a request: a 500 ``internal_error`` problem, one log record with where it happened,
and nothing of the exception's message (it may quote any value the failing code held, a secret included)."""

from __future__ import annotations

import json
import logging

from conftest import T1, FakeClock, sim_config

PATH = f"/crm/v2/tenant/{T1.tenant_id}/customers"


class BreakableClock(FakeClock):
    """The clock create_app takes; once ``broken`` it raises, as a bug in any step of the request path would."""

    broken = False

    def __call__(self) -> float:
        if self.broken:
            raise ZeroDivisionError(f"bug holding {T1.client_secret}")
        return self.now


async def test_an_unexpected_exception_is_a_500_internal_error_problem_logged_once(
    simulator, start_proxy, captured_logs, caplog
):
    clock = BreakableClock()
    proxy = await start_proxy(sim_config(simulator), prewarm=False, clock=clock)
    clock.broken = True
    caplog.set_level(logging.DEBUG)
    async with proxy.session.get(proxy.url + PATH, headers={"X-Request-ID": "req-500"}) as resp:
        body = await resp.read()
        assert resp.status == 500
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        assert resp.headers["X-ST-Proxy-Error"] == "internal_error"
        assert resp.headers["X-Request-ID"] == "req-500"
    problem = json.loads(body)
    assert (problem["status"], problem["request_id"]) == (500, "req-500")
    assert problem["type"].endswith("internal_error")

    records = [json.loads(line) for line in captured_logs().splitlines()]
    failures = [r for r in records if r.get("event") == "internal_error"]
    assert len(failures) == 1, records
    failure = failures[0]
    assert failure["logger"].startswith("st_proxy.") and failure["level"] == "error"
    assert failure["request_id"] == "req-500"
    # Where it happened (the frames) and what it was (the class), for whoever fixes the bug.
    assert "ZeroDivisionError" in failure["exception"] and "__call__" in failure["exception"]
    access = [r for r in records if r["logger"] == "st_proxy.access"]
    assert [(a["status"], a.get("error")) for a in access] == [(500, "internal_error")]
    # aiohttp saw a normal answer: it logged nothing of its own (no "Error handling request" with a traceback).
    assert [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.ERROR] == []
    everything = captured_logs() + body.decode() + caplog.text
    assert T1.client_secret not in everything


async def test_the_proxy_keeps_answering_after_an_internal_error(simulator, start_proxy, captured_logs):
    clock = BreakableClock()
    proxy = await start_proxy(sim_config(simulator), prewarm=False, clock=clock)
    clock.broken = True
    async with proxy.session.get(proxy.url + PATH) as resp:
        assert resp.status == 500
    clock.broken = False
    async with proxy.session.get(proxy.url + PATH) as resp:
        assert resp.status == 200
