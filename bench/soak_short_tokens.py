"""Soak: steady load through a real `st-proxy serve` in front of a real `st-proxy simulate --token-ttl 6`.

Both run as child processes on loopback. The load is bounded twice: --seconds and --max-requests, whichever comes
first. It prints the requests sent, the non-200 answers the client saw (expected: 0), the token requests each tenant
made (expected: one or two per token lifetime, since short tokens refresh at half their lifetime; never one per
request), and latency percentiles. Exits 1 if any answer was not a 200.

    .venv/bin/python bench/run.py soak_short_tokens [--seconds 40] [--max-requests 200000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import common

from st_proxy.devtools.simulator import DEMO_TENANTS

SCENARIO = "soak_short_tokens"
HELP = "steady load for --seconds against tokens that live --token-ttl seconds: no failures, few token requests"

TENANTS = DEMO_TENANTS[:2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=40, help="time bound of the load")
    parser.add_argument("--max-requests", type=int, default=200_000, help="count bound of the load")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent callers")
    parser.add_argument("--token-ttl", type=float, default=6, help="the simulator's token lifetime in seconds")


def run(args: argparse.Namespace) -> int:
    sim_args = ["--token-ttl", str(args.token_ttl)]
    for t in TENANTS:
        sim_args += ["--tenant", f"{t.tenant_id}:{t.client_id}:{t.client_secret}"]
    with tempfile.TemporaryDirectory() as tmp, common.Processes() as procs:
        # The simulator first (start_simulator waits for it): a proxy started before its token endpoint answers would
        # spend its first seconds backing off (and answering token_unavailable), which is not what this soak measures.
        sim = common.start_simulator(procs, *sim_args)
        config = common.write_config(Path(tmp), auth_url=f"{sim.url}/connect/token", api_url=sim.url, tenants=TENANTS)
        proxy = common.start_proxy(procs, config)
        prewarm = common.get_json(f"{sim.url}/_sim/stats")["token_requests_by_client"]
        urls = [f"{proxy.url}/crm/v2/tenant/{t.tenant_id}/customers?pageSize=5" for t in TENANTS]
        load = common.python_load(
            urls, seconds=args.seconds, max_requests=args.max_requests, concurrency=args.concurrency
        )
        stats = common.get_json(f"{sim.url}/_sim/stats")
        tenants = common.get_json(f"{proxy.admin_url}/tenants")["tenants"]
        token_events = collections.Counter(
            str(e["event"]) for e in proxy.events() if str(e.get("event", "")).startswith("token_")
        )

    failed = load.non_2xx + load.errors + sum(n for status, n in load.statuses.items() if status != 200)
    lifetimes = load.seconds / args.token_ttl
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"simulator token lifetime: {args.token_ttl:g} s; load: {args.concurrency} concurrent callers over "
        f"{len(TENANTS)} tenants for {load.seconds:.1f} s (bounds: {args.seconds:g} s, {args.max_requests} requests)"
    )
    print(common.table(common.LOAD_HEADER, [common.load_row("proxied", load)]))
    print(f"answers by status: {load.statuses}; connection errors: {load.errors}")
    rows = []
    by_client = stats["token_requests_by_client"]
    for t in TENANTS:
        total, at_start = by_client.get(t.client_id, 0), prewarm.get(t.client_id, 0)
        during = total - at_start
        rows.append([t.tenant_id, total, at_start, during, f"{during / lifetimes:.2f}" if lifetimes else "?"])
    print(common.table(["tenant", "token requests", "at prewarm", "during load", "per lifetime"], rows))
    print(f"token requests in total: {stats['token_requests']}; API requests at the simulator: {stats['api_requests']}")
    print(f"token_* log lines from the proxy: {dict(token_events) or 0}")
    print("replays per tenant: " + ", ".join(f"{t['id']}={t['replays']}" for t in tenants))
    return 0 if failed == 0 and load.requests else 1
