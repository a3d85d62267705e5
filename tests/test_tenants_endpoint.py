"""The admin port's view of the token lifecycle: prewarm and /readyz, and /tenants (docs/tokens.md, issue 3)."""

from __future__ import annotations

import json
import re
from datetime import datetime

from conftest import T1, sim_config
from test_tokens import TokenGate, gated_simulator, get, many_tenants  # noqa: F401 (a fixture)

from st_proxy.devtools.simulator import SimTenant

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


async def admin(proxy, path: str):
    async with proxy.session.get(proxy.admin_url + path) as resp:
        return resp.status, await resp.json()


def at(text: str) -> float:
    assert RFC3339.match(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_prewarm_fetches_every_tenant_at_most_prewarm_concurrency_at_a_time_and_readyz_waits_for_it(
    gated_simulator, start_proxy
):
    tenants = many_tenants(20)
    gate = TokenGate()
    gate.close()
    sim = await gated_simulator(gate, tenants=tenants)
    # One tenant's credentials are wrong: its first attempt fails, and readiness must not wait for a success.
    configured = [*tenants[:-1], SimTenant(tenants[-1].tenant_id, tenants[-1].client_id, "cs1.wrong")]
    proxy = await start_proxy(sim_config(sim, tenants=configured, tokens={"prewarm_concurrency": 4}))
    await gate.wait_for_arrivals(4)
    status, body = await admin(proxy, "/readyz")
    assert status == 503 and sorted(body["waiting_for"]) == sorted(t.tenant_id for t in tenants)
    assert gate.in_flight == 4
    gate.open()
    await proxy.runtime.tokens.wait_attempted(proxy.runtime.holder.current.tenants.values())
    assert await admin(proxy, "/readyz") == (200, {"status": "ready"})
    assert gate.max_in_flight == 4 and gate.arrived == 20 and sim.token_requests == 20
    _, listed = await admin(proxy, "/tenants")
    states = [t["token"]["state"] for t in listed["tenants"]]
    assert states == ["valid"] * 19 + ["rejected"]


async def test_readyz_stays_503_while_a_single_tenants_first_attempt_hangs(gated_simulator, start_proxy):
    gate = TokenGate(clients={"cid.t1"})
    gate.close()
    sim = await gated_simulator(gate, tenants=many_tenants(3))
    proxy = await start_proxy(sim_config(sim, tenants=many_tenants(3)))
    await gate.wait_for_arrivals(1)
    tenants = proxy.runtime.holder.current.tenants
    others = [tenants[t.tenant_id] for t in many_tenants(3) if t.client_id != "cid.t1"]
    await proxy.runtime.tokens.wait_attempted(others)
    assert await admin(proxy, "/readyz") == (503, {"status": "starting", "waiting_for": ["2000001"]})
    gate.open()
    await proxy.runtime.tokens.wait_attempted(tenants.values())
    assert (await admin(proxy, "/readyz"))[0] == 200


async def test_tenants_shows_each_state_with_times_errors_and_replays_but_never_a_secret_or_token(
    gated_simulator, start_proxy, clock
):
    valid, rejected, backing_off, refreshing, untouched = many_tenants(5)
    gate = TokenGate(clients={refreshing.client_id})
    sim = await gated_simulator(gate, tenants=[valid, rejected, backing_off, refreshing, untouched])
    configured = [
        valid,
        SimTenant(rejected.tenant_id, rejected.client_id, "cs1.wrong"),
        backing_off,
        refreshing,
        untouched,
    ]
    proxy = await start_proxy(sim_config(sim, tenants=configured), clock=clock, prewarm=False)
    started = clock()

    assert (await get(proxy, refreshing.tenant_id))[0] == 200
    clock.advance(800)  # inside refreshing's window; its refresh will hang at the gate
    assert (await get(proxy, valid.tenant_id))[0] == 200
    sim.revoke_tokens(valid.tenant_id)
    assert (await get(proxy, valid.tenant_id))[0] == 200  # one replay
    assert (await get(proxy, rejected.tenant_id))[0] == 502
    sim.fail_tokens(503, times=1)
    assert (await get(proxy, backing_off.tenant_id))[0] == 503
    gate.close()
    assert (await get(proxy, refreshing.tenant_id))[0] == 200
    await gate.wait_for_arrivals(2)

    status, body = await admin(proxy, "/tenants")
    assert status == 200
    by_id = {t["id"]: t for t in body["tenants"]}
    assert list(by_id) == [t.tenant_id for t in configured]
    assert {t["environment"] for t in body["tenants"]} == {"sim"}
    now = clock()
    assert by_id[valid.tenant_id]["token"]["state"] == "valid"
    assert at(by_id[valid.tenant_id]["token"]["expires_at"]) == int(now + 900)
    assert at(by_id[valid.tenant_id]["token"]["last_fetch"]) == int(now)
    assert by_id[valid.tenant_id]["replays"] == 1
    assert by_id[rejected.tenant_id]["token"] == {
        "state": "rejected",
        "expires_at": None,
        "last_fetch": by_id[valid.tenant_id]["token"]["last_fetch"],
        "last_error": "invalid_client",
    }
    assert by_id[backing_off.tenant_id]["token"]["state"] == "backing_off"
    assert by_id[backing_off.tenant_id]["token"]["last_error"] == "http_503"
    assert by_id[refreshing.tenant_id]["token"]["state"] == "refreshing"
    assert at(by_id[refreshing.tenant_id]["token"]["expires_at"]) == int(started + 900)
    assert by_id[untouched.tenant_id] == {
        "id": untouched.tenant_id,
        "environment": "sim",
        "replays": 0,
        "token": {"state": "none", "expires_at": None, "last_fetch": None, "last_error": None},
    }
    assert all(t["replays"] == 0 for t in body["tenants"] if t["id"] != valid.tenant_id)

    text = json.dumps(body)
    for tenant in configured:
        assert tenant.client_secret not in text
    for tenant in many_tenants(5):
        assert tenant.client_secret not in text
    assert not any(token in text for token in sim.issued_tokens)
    assert "cs1." not in text and "eyJ" not in text  # no secret, no JWT, whole or in part


async def test_a_token_past_expiry_minus_skew_with_no_failure_shows_state_none_and_its_old_expiry(
    simulator, start_proxy, clock
):
    proxy = await start_proxy(sim_config(simulator), clock=clock, prewarm=False)
    assert (await get(proxy, T1.tenant_id))[0] == 200
    clock.advance(900 - 30)
    _, body = await admin(proxy, "/tenants")
    token = next(t for t in body["tenants"] if t["id"] == T1.tenant_id)["token"]
    assert token["state"] == "none" and token["expires_at"] is not None
