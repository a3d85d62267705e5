"""Request targets whose meaning changes under path normalisation are refused before routing (st_proxy/http/target.py).

The path travels upstream exactly as received; a server that removes dot segments (RFC 3986 section 5.2.4), decodes
``%2e`` or merges ``//`` would read another tenant in it than the proxy did. Sent on a raw socket: an HTTP client
library would normalise these targets before they left.
"""

from __future__ import annotations

import json

import pytest
from conftest import T1, T2, sim_config
from wire import get

A, B = T1.tenant_id, T2.tenant_id


@pytest.mark.parametrize(
    "target",
    [
        f"/crm/v2/tenant/{A}/../../v2/tenant/{B}/customers",
        f"/crm/v2/tenant/{A}/%2e%2e/%2E%2E/v2/tenant/{B}/customers",
        f"/crm/v2/tenant/{A}/%2E%2e/x",
        f"/crm/v2/tenant/{A}/.%2e/x",
        f"/crm/v2/tenant/{A}/./customers",
        f"/crm/v2/tenant/{A}/%2e/customers",
        f"/crm/v2/tenant/{A}/customers/..",
        f"/crm/v2/tenant/{A}/customers/%2e%2e?page=1",
        f"/crm/v2/tenant/{A}//customers",
        f"//crm/v2/tenant/{A}/customers",
        f"/crm/v2/tenant/{A}%2F..%2F{B}/customers",  # a server that decodes %2F first sees ".." here
        f"/crm/v2/tenant/{A}/x%2F%2Fy",
    ],
)
async def test_dot_and_empty_segments_are_refused_before_routing(simulator, start_proxy, target):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    status, headers, body = await get(proxy.url, target)
    assert (status, headers.get("x-st-proxy-error")) == (400, "invalid_request"), body[:300]
    problem = json.loads(body)
    assert problem["tenant"] is None  # refused before routing: no tenant is named, neither A nor B
    assert simulator.api_requests == 0 and simulator.token_requests == 0


@pytest.mark.parametrize(
    "target",
    [
        f"/crm/v2/tenant/{A}/customers/",  # a trailing slash is no empty segment in between
        f"/crm/v2/tenant/{A}/customers?next=../../x&a=//b",  # the query is not the path
        f"/crm/v2/tenant/{A}/file.name/...",  # dots inside a name, and "...", are ordinary segments
        f"/crm/v2/tenant/%31{A[1:]}/customers",  # decoded as upstream decodes it: %31 is "1"
    ],
)
async def test_ordinary_targets_still_reach_the_upstream(simulator, start_proxy, target):
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    status, headers, _ = await get(proxy.url, target)
    assert "x-st-proxy-error" not in headers, (status, headers)
    assert simulator.api_requests == 1


async def test_an_encoded_slash_stays_inside_its_segment_for_routing(simulator, start_proxy):
    # Forwarded as "tenant%2F<id>": a path that names no tenant segment, so the proxy reads no tenant from it either.
    proxy = await start_proxy(sim_config(simulator), prewarm=False)
    status, headers, _ = await get(proxy.url, f"/crm/v2/tenant%2f{A}/customers")
    assert (status, headers.get("x-st-proxy-error")) == (400, "tenant_required")
    assert simulator.api_requests == 0
