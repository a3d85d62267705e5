"""What pacing costs, and whether replicas sharing Redis hold one budget (docs/limits.md).

1. The limiter's own cost per operation: the in-process GCRA reservation, and one Redis round trip (the Lua script)
   against Debian's `redis-server` on loopback.
2. Cost per request through a real `st-proxy serve` in front of `st-proxy simulate`, measured with wrk: no `limits`,
   `limits` with in-process state, and `limits` with Redis; the rate is set far above what wrk reaches, so nothing waits
   and the difference is the limiter's work.
3. The aggregate rate the simulator receives from 1, 2 and 3 replicas sharing one Redis, each driven by its own wrk,
   against a budget of --rate per second.

    .venv/bin/python bench/limits.py [--seconds 5] [--connections 20] [--rate 50]

Not run by CI; nothing here is asserted. Every process is on this machine's cores together, so the absolute numbers
are a floor and the differences are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common

SCENARIO = "limits"
HELP = "cost of the in-process and Redis limiters per request, and the rate 1-3 replicas sharing Redis hold"

BIN = Path(sys.executable).with_name("st-proxy")
PASSWORD = "bench-redis-password"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=20, help="wrk connections (per replica in part 3)")
    parser.add_argument("--rate", type=float, default=50, help="limits.rate_per_second for part 3")
    parser.add_argument("--operations", type=int, default=20000, help="limiter operations timed in part 1")


def wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def wrk(url: str, seconds: int, connections: int) -> dict[str, str]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "15s", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    result = {"rps": re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = match.group(1) if match else "?"
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = errors.group(1) if errors else "0"
    return result


def proxy_config(directory: Path, name: str, sim_port: int, limits: dict | None, redis_port: int | None) -> Path:
    from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS

    raw: dict = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {
            "sim": {"auth_url": f"http://127.0.0.1:{sim_port}/connect/token", "api_url": f"http://127.0.0.1:{sim_port}"}
        },
        "tenants": {
            t.tenant_id: {"environment": "sim", "client_id": t.client_id, "client_secret": {"value": t.client_secret}}
            for t in DEMO_TENANTS
        },
    }
    if limits is not None:
        raw["limits"] = limits
    if redis_port is not None:
        (directory / "redis_password").write_text(PASSWORD)
        raw["state"] = {
            "redis_url": f"redis://127.0.0.1:{redis_port}/0",
            "password": {"file": str(directory / "redis_password")},
            "timeout_ms": 500,
        }
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(raw))
    return path


def serve(procs: common.Processes, config: Path) -> tuple[common.Child, str]:
    """A `st-proxy serve` on free ports; returns it and its data URL."""
    data, admin = common.free_port(), common.free_port()
    text = json.loads(config.read_text())
    text["listen"], text["admin_listen"] = f"127.0.0.1:{data}", f"127.0.0.1:{admin}"
    config.write_text(json.dumps(text))
    proc = procs.start(config.stem, [str(BIN), "serve", "--config", str(config), "--log-level", "warning"])
    wait_http(f"http://127.0.0.1:{admin}/readyz", time.monotonic() + 20)
    return proc, f"http://127.0.0.1:{data}"


def sim_requests(sim_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/_sim/stats") as resp:
        return json.load(resp)["api_requests"]


class _OpenTransport:
    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def limit_step_cost(operations: int) -> float:
    """µs for the whole limit step in-process (admit: concurrency slot, reservation, metrics; then release)."""
    from aiohttp.test_utils import make_mocked_request
    from prometheus_client import CollectorRegistry

    from st_proxy.config import from_mapping
    from st_proxy.limits.budget import LocalBudgets
    from st_proxy.limits.limiter import Limiter
    from st_proxy.limits.state import PacingState
    from st_proxy.ops.metrics import Metrics

    config = from_mapping(
        {
            "app_key": "ak1.bench",
            "tenants": {"1000001": {"client_id": "c", "client_secret": "s"}},
            "limits": {"rate_per_second": 1e9, "burst": 1000},
        },
        {},
    )
    metrics = Metrics(CollectorRegistry())
    metrics.set_tenants(config.tenants)
    limiter = Limiter(PacingState(LocalBudgets()), metrics)
    limiter.ensure_metrics()
    tenant = config.tenants["1000001"]
    request = make_mocked_request("GET", "/crm/v2/tenant/1000001/customers", transport=_OpenTransport())
    started = time.perf_counter()
    for _ in range(operations):
        (await limiter.admit(request, config, tenant)).release()
    return (time.perf_counter() - started) / operations * 1e6


async def limiter_costs(redis_port: int, operations: int) -> tuple[float, float]:
    """(µs per in-process reservation, µs per Redis reservation round trip)."""
    from st_proxy.config.limits import StateConfig
    from st_proxy.config.secrets import Secret
    from st_proxy.limits.budget import LocalBudgets, Rate
    from st_proxy.limits.redis_state import RedisBudgets, client

    rate = Rate(1e9, 10)
    local = LocalBudgets()
    started = time.perf_counter()
    for i in range(operations):
        local.reserve(f"b:{i % 5000}", rate, 5)
    local_us = (time.perf_counter() - started) / operations * 1e6
    state = StateConfig(
        redis_url=f"redis://127.0.0.1:{redis_port}/0", password=Secret(PASSWORD, "bench"), timeout_ms=1000
    )
    shared = RedisBudgets(client(state), "bench:")
    count = max(1, operations // 10)
    await shared.reserve("b:warm", rate, 5)
    started = time.perf_counter()
    for i in range(count):
        await shared.reserve(f"b:{i % 5000}", rate, 5)
    redis_us = (time.perf_counter() - started) / count * 1e6
    await shared.close()
    return local_us, redis_us


def run(args: argparse.Namespace) -> int:
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 1
    path = "/crm/v2/tenant/1000001/customers/42"
    with tempfile.TemporaryDirectory() as tmp, common.Processes() as procs:
        directory = Path(tmp)
        redis_port = common.start_redis(procs, tmp, PASSWORD)
        local_us, redis_us = asyncio.run(limiter_costs(redis_port, args.operations))
        print(f"1. limiter alone ({args.operations} in-process reservations, {args.operations // 10} via Redis)")
        print(f"   in-process GCRA reservation: {local_us:8.2f} µs")
        print(f"   Redis reservation (one Lua round trip on loopback): {redis_us:8.2f} µs")
        step_us = asyncio.run(limit_step_cost(args.operations))
        print(f"   whole limit step in-process (slot, reservation, metrics, release): {step_us:8.2f} µs")

        sim_port = common.free_port()
        procs.start("simulator", [str(BIN), "simulate", "--listen", f"127.0.0.1:{sim_port}"])
        wait_http(f"http://127.0.0.1:{sim_port}/_sim/stats", time.monotonic() + 20)

        unpaced = {"rate_per_second": 1e6, "burst": 1000, "max_concurrent_per_tenant": None}
        print(
            f"\n2. per request through st-proxy serve (wrk -t2 -c{args.connections} -d{args.seconds}s GET {path}; "
            "rate far above wrk's, so nothing waits)"
        )
        print(f"   {'':24} {'req/s':>9} {'p50':>9} {'p99':>9} {'non-2xx':>8} {'µs/request':>11}")
        base_rps = None
        for name, limits, shared in (
            ("no limits", None, None),
            ("limits, in-process", unpaced, None),
            ("limits, Redis", unpaced, redis_port),
        ):
            proc, url = serve(
                procs, proxy_config(directory, name.replace(" ", "_").replace(",", ""), sim_port, limits, shared)
            )
            result = wrk(url + path, args.seconds, args.connections)
            proc.stop()
            rps = float(result["rps"])
            base_rps = base_rps or rps
            extra = (1 / rps - 1 / base_rps) * 1e6
            print(
                f"   {name:24} {result['rps']:>9} {result['p50']:>9} {result['p99']:>9} {result['non_2xx']:>8} "
                f"{extra:>+10.0f}"
            )

        paced = {"rate_per_second": args.rate, "burst": 10, "max_wait_seconds": 5}
        print(
            f"\n3. aggregate rate at the simulator, replicas sharing Redis, budget {args.rate:g}/s "
            f"(burst 10), wrk -c{args.connections} per replica for {args.seconds}s"
        )
        for replicas in (1, 2, 3):
            servers = [
                serve(procs, proxy_config(directory, f"replica{replicas}-{i}", sim_port, paced, redis_port))
                for i in range(replicas)
            ]
            before = sim_requests(sim_port)
            started = time.monotonic()
            results = _parallel_wrk([url + path for _, url in servers], args.seconds, args.connections)
            elapsed = time.monotonic() - started
            received = sim_requests(sim_port) - before
            callers = sum(float(r["rps"]) for r in results)
            print(
                f"   {replicas} replica(s): {received / elapsed:6.1f} requests/s reached the simulator "
                f"({received} in {elapsed:.1f}s); callers were answered {callers:.1f}/s "
                f"(non-2xx: {sum(int(r['non_2xx']) for r in results)})"
            )
            for proc, _ in servers:
                proc.stop()
    print(f"\n{os.cpu_count()} cores shared by wrk, the proxies, the simulator and redis-server")
    return 0


def _parallel_wrk(urls: list[str], seconds: int, connections: int) -> list[dict[str, str]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(lambda url: wrk(url, seconds, connections), urls))


def main() -> int:
    parser = argparse.ArgumentParser(description=HELP)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
