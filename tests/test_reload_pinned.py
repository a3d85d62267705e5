"""What a reload must not change while running: the sockets, the client sessions and token client, and the shutdown
timeouts are built once at start (st_proxy/server/reload.py). Each is listed here by name, on purpose not read from
``reload.FIXED_AT_START``: dropping one from that tuple must fail this test."""

from __future__ import annotations

import json

import pytest
from conftest import T1, T2, sim_config
from prometheus_client import CollectorRegistry

from st_proxy.ops.metrics import Metrics
from st_proxy.server.reload import ConfigHolder, Reloader

CHANGED = {
    "listen": "127.0.0.1:18081",
    "admin_listen": "127.0.0.1:19091",
    "upstream": {"read_timeout_seconds": 7, "max_connections": 3},
    "tokens": {"refresh_ahead_seconds": 11, "fetch_timeout_seconds": 2, "replay_body_limit_bytes": 5},
    "shutdown": {"drain_seconds": 1, "timeout_seconds": 2},
}


@pytest.mark.parametrize("section", sorted(CHANGED))
async def test_a_reload_keeps_the_start_up_value_of_each_fixed_section_and_applies_the_rest(section, captured_logs):
    started = sim_config(tenants=(T1,))
    edited = sim_config(tenants=(T1, T2), **{section: CHANGED[section]})
    assert getattr(edited, section) != getattr(started, section)  # the edit really changes the section
    holder = ConfigHolder(started)
    reloader = Reloader(holder, Metrics(CollectorRegistry()), tokens=lambda: None, load=lambda: edited)

    assert await reloader.reload_now("test") is True
    assert getattr(holder.current, section) == getattr(started, section)
    assert set(holder.current.tenants) == {T1.tenant_id, T2.tenant_id}  # everything else is applied
    warnings = [json.loads(line) for line in captured_logs().splitlines()]
    restart = [w for w in warnings if w.get("event") == "config_reload_restart_needed"]
    assert [w["keys"] for w in restart] == [[section]]
