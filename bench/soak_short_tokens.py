"""Soak: steady load through a real `st-proxy serve` in front of a real `st-proxy simulate --token-ttl 6`.

Both run as separate processes on loopback. The load is bounded twice: a fixed duration and a maximum request count,
whichever comes first. At the end it prints the requests sent, the non-200 answers the client saw (expected: 0), the
token requests each tenant made (expected: one or two per 6 s lifetime, since short tokens refresh at half their
lifetime; never one per request), and latency percentiles.

    .venv/bin/python bench/soak_short_tokens.py [--seconds 40] [--max-requests 200000] [--concurrency 8]

Not run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

TENANTS = {"1000001": ("cid.demo1", "cs1.demo-secret-1"), "1000002": ("cid.demo2", "cs1.demo-secret-2")}
APP_KEY = "ak1.demo-app-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_until_up(session: aiohttp.ClientSession, url: str, want: int = 200, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as resp:
                if resp.status == want:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not answer {want} within {seconds} s")


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def drive(proxy_url: str, seconds: float, max_requests: int, concurrency: int):
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    sent = 0
    deadline = time.monotonic() + seconds
    tenant_ids = list(TENANTS)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(n: int) -> None:
            nonlocal sent
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                tenant = tenant_ids[sent % len(tenant_ids)]
                started = time.perf_counter()
                try:
                    async with session.get(f"{proxy_url}/crm/v2/tenant/{tenant}/customers?pageSize=5") as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except aiohttp.ClientError as exc:
                    errors[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - started)

        began = time.monotonic()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.monotonic() - began
    return sent, statuses, errors, sorted(latencies), elapsed


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--token-ttl", type=float, default=6)
    args = parser.parse_args()

    sim_port, data_port, admin_port = free_port(), free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    workdir = Path(tempfile.mkdtemp(prefix="st-proxy-soak-"))
    config = {
        "listen": f"127.0.0.1:{data_port}",
        "admin_listen": f"127.0.0.1:{admin_port}",
        "app_key": {"value": APP_KEY},
        "environments": {"sim": {"auth_url": f"{sim_url}/connect/token", "api_url": sim_url}},
        "tenants": {
            tid: {"environment": "sim", "client_id": cid, "client_secret": {"value": secret}}
            for tid, (cid, secret) in TENANTS.items()
        },
    }
    config_path = workdir / "config.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    st_proxy = [sys.executable, "-m", "st_proxy"]
    sim_cmd = [*st_proxy, "simulate", "--listen", f"127.0.0.1:{sim_port}", "--token-ttl", str(args.token_ttl)]
    for tid, (cid, secret) in TENANTS.items():
        sim_cmd += ["--tenant", f"{tid}:{cid}:{secret}"]
    log_path = workdir / "proxy.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sim = subprocess.Popen(sim_cmd, stdout=subprocess.DEVNULL, env=env)
    proxy: subprocess.Popen | None = None
    try:
        async with aiohttp.ClientSession() as session:
            # The simulator first: a proxy started before its token endpoint answers would spend its first seconds
            # backing off (and answering token_unavailable), which is not what this soak measures.
            await wait_until_up(session, f"{sim_url}/_sim/stats")
            with open(log_path, "w") as log_file:
                proxy = subprocess.Popen(
                    [*st_proxy, "serve", "--config", str(config_path), "--log-level", "info"], stdout=log_file, env=env
                )
            await wait_until_up(session, f"http://127.0.0.1:{admin_port}/readyz")
            async with session.get(f"{sim_url}/_sim/stats") as resp:
                prewarm_tokens = (await resp.json())["token_requests_by_client"]
        sent, statuses, errors, latencies, elapsed = await drive(
            f"http://127.0.0.1:{data_port}", args.seconds, args.max_requests, args.concurrency
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{sim_url}/_sim/stats") as resp:
                stats = await resp.json()
            async with session.get(f"http://127.0.0.1:{admin_port}/tenants") as resp:
                tenants = (await resp.json())["tenants"]
    finally:
        processes = [p for p in (proxy, sim) if p is not None]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()

    non_200 = sum(n for status, n in statuses.items() if status != 200) + sum(errors.values())
    lifetimes = elapsed / args.token_ttl
    token_events = collections.Counter()
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line).get("event", "")
        except ValueError:
            continue
        if str(event).startswith("token_"):
            token_events[event] += 1

    print(f"command: {' '.join(sys.argv)}")
    print(
        f"simulator token lifetime: {args.token_ttl:g} s; load: {args.concurrency} concurrent callers over "
        f"{len(TENANTS)} tenants for {elapsed:.1f} s (bounds: {args.seconds:g} s, {args.max_requests} requests)"
    )
    print(f"requests sent: {sent}  ({sent / elapsed:.0f}/s)")
    print(f"non-200 answers seen by the client: {non_200}  statuses={dict(statuses)} errors={dict(errors)}")
    by_client = stats["token_requests_by_client"]
    for tid, (cid, _) in TENANTS.items():
        during = by_client.get(cid, 0) - prewarm_tokens.get(cid, 0)
        print(
            f"token requests, tenant {tid}: {by_client.get(cid, 0)} in total ({prewarm_tokens.get(cid, 0)} at "
            f"prewarm, {during} during the load = {during / lifetimes:.2f} per {args.token_ttl:g} s lifetime)"
        )
    print(f"token requests in total: {stats['token_requests']}; API requests at the simulator: {stats['api_requests']}")
    print(f"token_* log lines from the proxy: {dict(token_events) or 0}")
    print(
        "latency ms: "
        + "  ".join(f"p{p}={percentile(latencies, p) * 1000:.2f}" for p in (50, 90, 99, 99.9))
        + f"  max={latencies[-1] * 1000:.2f}"
    )
    print("replays per tenant: " + ", ".join(f"{t['id']}={t['replays']}" for t in tenants))
    return 0 if non_200 == 0 else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
