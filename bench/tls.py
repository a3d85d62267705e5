"""What TLS costs per request: the plain data port, the TLS data port, and the forward-proxy mode (CONNECT + TLS).

Starts `st-proxy simulate` and two `st-proxy serve` processes on loopback (one with a plain data port and the
forward-proxy listener, one with TLS on the data port; certificates from the local CA of `st_proxy.tls.certs`), then
drives each mode in turn with an aiohttp client, `--concurrency` callers for `--seconds` (and at most
`--max-requests`), twice: with kept-alive connections, and with a new connection per request (what a library calling
module-level `requests.get` does: through the forward proxy that is a CONNECT, a TLS handshake and a leaf from the
cache, every time). Prints req/s, latency percentiles and the serving proxy's CPU time per request (from
/proc/PID/stat), which is the number to compare: the client shares the machine's cores, so req/s is a floor.

    .venv/bin/python bench/tls.py [--seconds 3] [--rounds 3] [--concurrency 16] [--max-requests 20000]
    .venv/bin/python bench/run.py tls ...

Not run by CI; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import common

from st_proxy.devtools.simulator import DEMO_TENANTS
from st_proxy.tls.certs import LocalCA, write_ca, write_pair

SCENARIO = "tls"
HELP = "cost per request of the TLS data port and the forward-proxy mode, against the plain data port"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=3.0, help="per mode and round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="callers at once (default 16)")
    parser.add_argument("--max-requests", type=int, default=20000, help="per mode, an upper bound (default 20000)")
    parser.add_argument("--log-level", default="info", help="the proxies' log level (default info, as in production)")


async def _load(
    url: str, *, proxy: str | None, context: ssl.SSLContext | bool, fresh: bool, args: argparse.Namespace
) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    end = time.monotonic() + args.seconds
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=fresh)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def caller() -> None:
            nonlocal failures
            while time.monotonic() < end and len(latencies) + failures < args.max_requests:
                started = time.perf_counter()
                try:
                    async with session.get(url, proxy=proxy, ssl=context) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "failures": failures,
        "rps": count / elapsed if elapsed else 0.0,
        "p50": latencies[count // 2] * 1000 if count else 0.0,
        "p99": latencies[min(count - 1, int(count * 0.99))] * 1000 if count else 0.0,
        "mean": statistics.fmean(latencies) * 1000 if count else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    tenant = DEMO_TENANTS[0]
    path = f"/crm/v2/tenant/{tenant.tenant_id}/customers/42"
    with tempfile.TemporaryDirectory(prefix="st-proxy-bench-tls-") as tmp, common.Processes() as procs:
        base = Path(tmp)
        ca = LocalCA.create(permit=["api.servicetitan.io", "auth.servicetitan.io", "localhost", "127.0.0.1"])
        write_ca(ca, base / "ca")
        write_pair(*ca.issue(["localhost", "127.0.0.1"]), base / "server")
        trust = ssl.create_default_context(cafile=str(base / "ca" / "ca.crt"))
        handshakes = asyncio.run(_handshake_cpu(base, rounds=7, per_round=100))

        sim = common.start_simulator(procs)
        urls = {"auth_url": f"{sim.url}/connect/token", "api_url": sim.url}
        (base / "plain").mkdir()
        (base / "tls").mkdir()
        ca_files = {"ca_cert_file": str(base / "ca" / "ca.crt"), "ca_key_file": str(base / "ca" / "ca.key")}
        plain_config = common.write_config(base / "plain", **urls, forward_proxy={"listen": "127.0.0.1:0", **ca_files})
        server_files = {"cert_file": str(base / "server" / "tls.crt"), "key_file": str(base / "server" / "tls.key")}
        tls_config = common.write_config(base / "tls", **urls, tls=server_files)
        plain = common.start_proxy(procs, plain_config, log_level=args.log_level)
        secured = common.start_proxy(procs, tls_config, log_level=args.log_level)
        forward = next(e["forward_proxy_listen"] for e in plain.events() if e.get("event") == "start")
        tls_port = secured.url.rsplit(":", 1)[1]

        modes = [
            ("plain data port", f"{plain.url}{path}", None, True, plain.child.pid),
            ("TLS data port", f"https://localhost:{tls_port}{path}", None, trust, secured.child.pid),
            ("forward proxy", f"https://api.servicetitan.io{path}", f"http://{forward}", trust, plain.child.pid),
        ]
        # Interleaved: every mode once per round, so a burst of other load on the machine hits all of them; each
        # cell is the median over the rounds.
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for fresh in (False, True):
            for _name, url, proxy, context, _pid in modes:
                asyncio.run(_load(url, proxy=proxy, context=context, fresh=fresh, args=_warmup(args)))
        for _ in range(args.rounds):
            for fresh in (False, True):
                for name, url, proxy, context, pid in modes:
                    cpu_before = common.cpu_seconds(pid)
                    result = asyncio.run(_load(url, proxy=proxy, context=context, fresh=fresh, args=args))
                    cpu = common.cpu_seconds(pid) - cpu_before
                    result["cpu_us"] = cpu / result["requests"] * 1e6 if result["requests"] else 0.0
                    runs.setdefault(("new connection" if fresh else "kept alive", name), []).append(result)
    failures = sum(int(r["failures"]) for results in runs.values() for r in results)
    print(
        f"GET {path}, {args.concurrency} callers, {args.seconds:g} s per mode, median of {args.rounds} interleaved "
        f"rounds, proxies at log level {args.log_level}, "
        f"{os.cpu_count()} cores shared by client, proxies and simulator"
    )
    print(
        f"{'connections':15} {'mode':16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'proxy CPU/req':>14} {'failed':>7}"
    )
    for (conn, name), results in runs.items():
        r = {key: statistics.median(result[key] for result in results) for key in results[0]}
        failed = sum(int(result["failures"]) for result in results)  # every failure counts, not a median
        print(f"{conn:15} {name:16} {r['rps']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} {r['cpu_us']:11.0f} us {failed:7d}")
    print("\nCPU per TLS handshake, client and server together (median of 7 interleaved rounds of 100):")
    for name, micros in handshakes.items():
        print(f"  {name:16} {micros:6.0f} us")
    return 1 if failures else 0


async def _handshake_cpu(base: Path, rounds: int, per_round: int) -> dict[str, float]:
    """CPU time per TLS handshake (client and server in this process, so both sides count) against a plain server
    context, the data port's listener context with its SNI callback, and that callback swapping in a renewed
    context, interleaved round by round; the medians."""
    from st_proxy.config.tls import TLSConfig
    from st_proxy.tls.server_context import ServerTLS, build

    tls = TLSConfig(base / "server" / "tls.crt", base / "server" / "tls.key")
    client = ssl.create_default_context(cafile=str(base / "ca" / "ca.crt"))
    renewed = ServerTLS(tls)
    renewed.current = build(tls)
    contexts = {
        "plain context": build(tls),
        "SNI callback": ServerTLS(tls).listener,
        "callback + swap": renewed.listener,
    }

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    servers = {name: await asyncio.start_server(close, "127.0.0.1", 0, ssl=ctx) for name, ctx in contexts.items()}
    samples: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(rounds):
            for name, server in servers.items():
                port = server.sockets[0].getsockname()[1]
                began = time.process_time()
                for _ in range(per_round):
                    _, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=client, server_hostname="localhost"
                    )
                    writer.close()
                samples[name].append((time.process_time() - began) / per_round * 1e6)
    finally:
        for server in servers.values():
            server.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def _warmup(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "seconds": min(1.0, args.seconds), "max_requests": 500})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=HELP)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
