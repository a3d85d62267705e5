"""Throughput and latency through the proxy against the bundled simulator, and the same request sent straight to it.

Three real processes on loopback: `st-proxy simulate`, `st-proxy serve` in front of it, and the load generator (wrk,
Debian's `wrk` package, or the bundled aiohttp one). The direct baseline carries a token fetched once by hand. Each
run is bounded by --seconds and, for the bundled generator, by --max-requests too.

    .venv/bin/python bench/run.py throughput [--seconds 10] [--connections 50] [--load-generator wrk|python]

The machine's cores are shared by all three processes, so the absolute numbers are a floor.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import urllib.parse
from pathlib import Path

import common

from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS

SCENARIO = "throughput"
HELP = "req/s and latency through the proxy to the simulator, and straight to the simulator as the baseline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--connections", type=int, default=50, help="concurrent keep-alive connections")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument(
        "--load-generator",
        choices=("wrk", "python"),
        default="wrk" if common.have_wrk() else "python",
        help="wrk (Debian's package) or the bundled aiohttp generator",
    )
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="count bound of the bundled generator")


def run(args: argparse.Namespace) -> int:
    if args.load_generator == "wrk" and not common.have_wrk():
        print("throughput: wrk is not installed (apt-get install wrk), or use --load-generator python")
        return 2
    tenant = DEMO_TENANTS[0]
    path = f"/crm/v2/tenant/{tenant.tenant_id}/customers/42"

    def load(url: str, headers: dict[str, str]) -> common.Load:
        if args.load_generator == "wrk":
            return common.wrk(url, seconds=args.seconds, connections=args.connections, headers=headers)
        assert not headers, "the bundled generator sends no credentials: it only drives the proxy"
        return common.python_load(
            url, seconds=args.seconds, max_requests=args.max_requests, concurrency=args.connections
        )

    with tempfile.TemporaryDirectory() as tmp, common.Processes() as procs:
        sim = common.start_simulator(procs)
        config = common.write_config(Path(tmp), auth_url=f"{sim.url}/connect/token", api_url=sim.url)
        proxy = common.start_proxy(procs, config, log_level=args.log_level)
        rows = []
        if args.load_generator == "wrk":
            form = urllib.parse.urlencode(
                {
                    "grant_type": "client_credentials",
                    "client_id": tenant.client_id,
                    "client_secret": tenant.client_secret,
                }
            ).encode()
            token = common.get_json(f"{sim.url}/connect/token", data=form)["access_token"]
            credentials = {"Authorization": f"Bearer {token}", "ST-App-Key": DEMO_APP_KEY}
            rows.append(common.load_row("direct", load(f"{sim.url}{path}", credentials)))
        cpu_before = common.cpu_seconds(proxy.child.pid)
        proxied = load(f"{proxy.url}{path}", {})
        cpu = common.cpu_seconds(proxy.child.pid) - cpu_before
        rows.append(common.load_row("proxied", proxied))
        stats = common.get_json(f"{sim.url}/_sim/stats")
    print(
        f"{args.load_generator} -c{args.connections} for {args.seconds} s, GET {path}, proxy log level "
        f"{args.log_level}, {os.cpu_count()} cores shared by the load generator, proxy and simulator"
    )
    print(common.table(common.LOAD_HEADER, rows))
    per_request = cpu / proxied.requests * 1e6 if proxied.requests else float("nan")
    print(f"proxy CPU: {cpu:.2f} s over {proxied.requests} requests = {per_request:.0f} us per request")
    by_hand = " plus 1 by hand for the direct run" if args.load_generator == "wrk" else ""
    print(f"token requests at the simulator: {stats['token_requests']} (prewarm{by_hand})")
    return 0 if proxied.requests and not proxied.non_2xx and not proxied.errors else 1
