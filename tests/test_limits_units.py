"""The pieces of the limits subsystem on their own: GCRA arithmetic, Retry-After, budget keys, the sweep of idle
budgets, and the concurrency slots (with the injected clock)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import FakeClock, sim_config

from st_proxy.config.limits import LimitsConfig
from st_proxy.limits import budget as budget_module
from st_proxy.limits.budget import LocalBudgets, Rate
from st_proxy.limits.keys import budget, report_of, retry_after
from st_proxy.limits.slots import ConcurrencySlots


def test_gcra_lets_the_burst_through_then_spaces_and_refuses_without_reserving():
    clock = FakeClock()
    budgets = LocalBudgets(clock)
    rate = Rate(4, 2)
    waits = [budgets.reserve("k", rate, 1).wait for _ in range(4)]
    assert waits == pytest.approx([0, 0, 0.25, 0.5])
    refused = budgets.reserve("k", rate, 0.5)
    assert not refused.ok and refused.wait == pytest.approx(0.75)
    assert budgets.reserve("k", rate, 1).wait == pytest.approx(0.75)  # the refusal moved nothing


def test_a_hold_starts_the_schedule_at_its_end_with_the_burst_used_up():
    clock = FakeClock()
    budgets = LocalBudgets(clock)
    rate = Rate(10, 5)
    budgets.hold("k", rate, 2)
    assert budgets.held_for("k") == pytest.approx(2)
    assert [budgets.reserve("k", rate, 5).wait for _ in range(3)] == pytest.approx([2, 2.1, 2.2])
    budgets.hold("k", rate, 1)  # a shorter hold never shortens a longer one
    assert budgets.held_for("k") == pytest.approx(2)


def test_an_unpaced_budget_still_honours_holds():
    clock = FakeClock()
    budgets = LocalBudgets(clock)
    rate = Rate(None, 10)
    assert {budgets.reserve("k", rate, 0).wait for _ in range(100)} == {0}
    budgets.hold("k", rate, 3)
    assert budgets.reserve("k", rate, 5).wait == pytest.approx(3)
    assert not budgets.reserve("k", rate, 2).ok


def test_a_refund_gives_back_only_the_last_reservation():
    clock = FakeClock()
    budgets = LocalBudgets(clock)
    rate = Rate(1, 1)
    budgets.reserve("k", rate, 5)
    second = budgets.reserve("k", rate, 5)
    third = budgets.reserve("k", rate, 5)
    budgets.refund("k", rate, second.mark)  # not the last: later reservations keep their places
    assert budgets.reserve("k", rate, 5).wait == pytest.approx(3)
    budgets.refund("k", rate, third.mark)
    assert budgets.reserve("k", rate, 5).wait == pytest.approx(4)


def test_idle_budgets_are_swept_so_thousands_of_tenants_and_reports_stay_cheap(monkeypatch):
    monkeypatch.setattr(budget_module, "SWEEP_EVERY", 100)
    clock = FakeClock()
    budgets = LocalBudgets(clock)
    for i in range(5000):
        budgets.reserve(f"tenant-{i}", Rate(50, 10), 5)
    assert len(budgets) <= 5000
    clock.advance(1)
    for i in range(200):
        budgets.reserve(f"report-{i}", Rate(1 / 60, 1), 5)
    assert len(budgets) <= 200


def test_scaling_a_rate_keeps_at_least_one_request_of_burst():
    assert Rate(60, 10).scaled(1 / 3) == Rate(20, 3)
    assert Rate(60, 1).scaled(0.5) == Rate(30, 1)
    assert Rate(None, 4).scaled(0.5) == Rate(None, 4)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3),
        ("0", 0),
        ("", 1),
        ("soon", 1),
        ("-5", 1),
        ("86400", 60),
        ("Sat, 28 Nov 2026 00:00:10 GMT", 10),
        ("Sat, 28 Nov 2026 00:00:00 GMT", 0),
    ],
)
def test_retry_after_is_seconds_or_a_date_one_second_when_unusable_at_most_sixty(value, seconds):
    now = 1795824000.0  # Sat, 28 Nov 2026 00:00:00 GMT
    headers = {"Retry-After": value} if value else {}
    assert retry_after(headers, now) == pytest.approx(seconds)


def test_report_data_calls_are_told_apart_by_method_and_path():
    path = "/reporting/v2/tenant/42/report-category/ops/reports/175/data"
    assert report_of("POST", path) == "ops/175"
    assert report_of("GET", path) is None
    assert report_of("POST", "/reporting/v2/tenant/42/report-category/ops/reports/175") is None
    assert report_of("POST", "/reporting/v2/tenant/42/report-category/a b/reports/x/data") != "a b/x"


def test_a_budget_belongs_to_environment_app_key_and_tenant_and_reports_have_their_own():
    config = sim_config()
    tenant = config.tenants["1000001"]
    key, rate = budget("GET", "/crm/v2/tenant/1000001/customers", tenant, LimitsConfig(rate_per_second=40, burst=4))
    assert key == f"b:sim:{tenant.app_key.fingerprint()}:1000001"
    assert rate == Rate(40, 4)
    assert tenant.app_key.reveal() not in key
    key, rate = budget("POST", "/reporting/v2/tenant/1000001/report-category/c/reports/9/data", tenant, LimitsConfig())
    assert key.startswith("r:sim:") and key.endswith(":1000001:c/9")
    assert rate == Rate(1 / 60, 1)


async def test_concurrency_slots_time_out_leave_no_trace_and_pass_on_in_order():
    parked: list[asyncio.Future[None]] = []

    async def sleep(seconds: float) -> None:
        parked.append(asyncio.get_running_loop().create_future())
        await parked[-1]

    slots = ConcurrencySlots(sleep)
    assert await slots.acquire("t", 1, 5)
    late = asyncio.create_task(slots.acquire("t", 1, 5))
    first = asyncio.create_task(slots.acquire("t", 1, 5))
    while len(parked) < 2:
        await asyncio.sleep(0)
    parked[0].set_result(None)  # the first waiter's deadline passes
    assert await late is False
    slots.release("t")
    assert await first is True and slots.in_use("t") == 1
    slots.release("t")
    assert slots.in_use("t") == 0 and not slots._tenants  # nothing kept for an idle tenant
