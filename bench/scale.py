"""Scale: thousands of tenants. Scrape time and size, the data port during scrapes, readiness, token request rate, RSS.

For each tenant count (default 1,000 and 5,000) and each ``metrics.tenant_histograms`` setting it runs, on loopback:

- a simulator (this file run as ``_simulator``: the bundled one, with every token request's arrival time recorded and
  each token answer delayed by ``--token-delay``, 100 ms by default, like a slow throttled token endpoint);
- a real ``st-proxy serve`` with that many tenants, each secret in its own file (as a Kubernetes Secret volume would
  hold them, so the file watcher has them all to look at);

then measures:

- ``ready_s``: from spawning the proxy until ``/readyz`` answers 200;
- ``tok_max_1s``: the most token requests the simulator saw in any one-second window, from start until the end of the
  run (prewarm goes on in the background after readiness); ``tok_total`` how many it saw in all;
- ``scrape_s`` / ``scrape_mib``: the slowest of ``--scrapes`` ``/metrics`` scrapes (uncompressed, as
  ``Accept-Encoding: identity``) and its size; ``series``: its sample lines;
- ``probe_max_ms``: the slowest data-port request (a GET through the proxy for an already warmed tenant, one every
  20 ms) while the scrapes run back to back; ``probe_idle_ms``: the same with no scrape running;
- ``rss_mib``: the proxy's resident memory (``VmRSS``) before the scrapes, and ``rss_after`` after them.

    .venv/bin/python bench/scale.py [--tenants 1000,5000] [--histograms both|true|false] [--scrapes 5]
    .venv/bin/python bench/scale.py --legacy   # a proxy without the scale settings (the "before" run)

``--legacy`` leaves ``metrics`` and the prewarm pacing keys out of the config, for measuring a build that does not
know them. Not run by CI; every wait is bounded (``--ready-timeout``). The numbers depend on the machine: the proxy,
the simulator and this script share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

SCENARIO = "scale"
HELP = "1,000 and 5,000 tenants: /metrics scrapes, data-port latency during scrapes, readiness, token rate, RSS"

APP_KEY = "ak1.scale-bench"
FIRST_TENANT = 3_000_000
PROBE_INTERVAL = 0.02


def tenant_ids(count: int) -> list[str]:
    return [str(FIRST_TENANT + i) for i in range(count)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenants", default="1000,5000", help="comma-separated tenant counts (default 1000,5000)")
    parser.add_argument("--histograms", choices=("both", "true", "false"), default="both")
    parser.add_argument("--token-delay", type=float, default=0.1, help="seconds the token endpoint takes per token")
    parser.add_argument("--scrapes", type=int, default=5, help="scrapes per run (back to back)")
    parser.add_argument("--rate", type=float, default=20, help="tokens.prewarm_rate_per_second")
    parser.add_argument("--ready-seconds", type=float, default=10, help="tokens.prewarm_ready_seconds")
    parser.add_argument("--ready-timeout", type=float, default=180, help="give up waiting for /readyz after this")
    parser.add_argument("--settle", type=float, default=3, help="seconds to watch token requests after the scrapes")
    parser.add_argument("--legacy", action="store_true", help="omit the scale settings (a build without them)")
    parser.add_argument("--json", action="store_true", help="also print each run as a JSON line")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best = 0
    for i, t in enumerate(times):
        best = max(best, bisect.bisect_right(times, t + window - 1e-9) - i)
    return best


def write_config(directory: Path, ids: list[str], sim_url: str, data: int, admin: int, args, histograms: bool) -> Path:
    secrets = directory / "secrets"
    secrets.mkdir()
    lines = [
        f"listen: 127.0.0.1:{data}",
        f"admin_listen: 127.0.0.1:{admin}",
        f"app_key: {{value: {APP_KEY}}}",
        "environments:",
        f"  sim: {{auth_url: {sim_url}/connect/token, api_url: {sim_url}}}",
        "tokens:",
        "  prewarm_concurrency: 8",
    ]
    if not args.legacy:
        lines += [
            f"  prewarm_rate_per_second: {args.rate}",
            f"  prewarm_ready_seconds: {args.ready_seconds}",
            "metrics:",
            f"  tenant_histograms: {'true' if histograms else 'false'}",
        ]
    lines.append("tenants:")
    for i, tenant in enumerate(ids):
        (secrets / tenant).write_text(f"cs.scale-{i}\n")
        lines.append(
            f'  "{tenant}": {{environment: sim, client_id: cid.scale{i}, client_secret: {{file: secrets/{tenant}}}}}'
        )
    path = directory / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def wait_until(check, deadline: float, what: str) -> None:
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit(f"{what} within the time allowed")


async def one_run(count: int, histograms: bool, args) -> dict:
    import aiohttp

    ids = tenant_ids(count)
    sim_port, data, admin = free_port(), free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="st-proxy-scale-") as tmp:
        config = write_config(Path(tmp), ids, sim_url, data, admin, args, histograms)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
            try:
                sim = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "_simulator", str(sim_port), str(count), str(args.token_delay)
                )
                procs.append(sim)

                async def sim_up() -> bool:
                    async with http.get(f"{sim_url}/_sim/stats") as r:
                        return r.status == 200

                await wait_until(sim_up, time.monotonic() + 30, "the simulator did not start")
                st_proxy = Path(sys.executable).with_name("st-proxy")
                started = time.monotonic()
                proxy = await asyncio.create_subprocess_exec(
                    st_proxy,
                    "serve",
                    "--config",
                    str(config),
                    "--log-level",
                    "warning",
                    stdout=asyncio.subprocess.DEVNULL,
                )
                procs.append(proxy)

                async def ready() -> bool:
                    async with http.get(f"http://127.0.0.1:{admin}/readyz") as r:
                        return r.status == 200

                await wait_until(ready, started + args.ready_timeout, "/readyz did not answer 200")
                ready_s = time.monotonic() - started

                probe_url = f"http://127.0.0.1:{data}/crm/v2/tenant/{ids[0]}/customers/1"
                probe_times: list[float] = []
                stop_probe = asyncio.Event()

                async def probe() -> None:
                    while not stop_probe.is_set():
                        t = time.perf_counter()
                        async with http.get(probe_url) as r:
                            await r.read()
                            if r.status != 200:
                                raise SystemExit(f"probe answered {r.status}")
                        probe_times.append(time.perf_counter() - t)
                        await asyncio.sleep(PROBE_INTERVAL)

                async with http.get(probe_url) as r:  # the probe tenant's token: warmed now if it was not yet
                    await r.read()
                prober = asyncio.create_task(probe())
                await asyncio.sleep(2)
                idle_probes, probe_times[:] = list(probe_times), []
                rss_before = rss_mib(proxy.pid)

                scrape_s, size, body = 0.0, 0, b""
                for _ in range(args.scrapes):
                    t = time.perf_counter()
                    async with http.get(
                        f"http://127.0.0.1:{admin}/metrics", headers={"Accept-Encoding": "identity"}
                    ) as r:
                        body = await r.read()
                    scrape_s = max(scrape_s, time.perf_counter() - t)
                    size = len(body)
                await asyncio.sleep(0.2)
                stop_probe.set()
                await prober
                scrape_probes = probe_times
                # Counted after the probes stopped: splitting 14 MiB here would hold this script's loop, and the
                # probes' clocks with it.
                series = sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
                await asyncio.sleep(args.settle)
                rss_after = rss_mib(proxy.pid)
                async with http.get(f"{sim_url}/_bench/token-times") as r:
                    token_times = await r.json()
                async with http.get(f"http://127.0.0.1:{admin}/tenants") as r:
                    warmed = sum(1 for t in (await r.json())["tenants"] if t["token"]["state"] == "valid")
            finally:
                for proc in reversed(procs):
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                        try:
                            await asyncio.wait_for(proc.wait(), 30)
                        except TimeoutError:
                            proc.kill()
                            await proc.wait()
    return {
        "tenants": count,
        "histograms": "n/a" if args.legacy else str(histograms).lower(),
        "ready_s": round(ready_s, 1),
        "tok_max_1s": max_in_window(token_times),
        "tok_total": len(token_times),
        "warmed": warmed,
        "scrape_s": round(scrape_s, 3),
        "scrape_mib": round(size / 2**20, 2),
        "series": series,
        "probe_idle_ms": round(max(idle_probes) * 1000, 1),
        "probe_max_ms": round(max(scrape_probes) * 1000, 1),
        "probes": len(scrape_probes),
        "rss_mib": round(rss_before, 1),
        "rss_after": round(rss_after, 1),
    }


COLUMNS = (
    "tenants",
    "histograms",
    "ready_s",
    "tok_max_1s",
    "tok_total",
    "warmed",
    "scrape_s",
    "scrape_mib",
    "series",
    "probe_idle_ms",
    "probe_max_ms",
    "probes",
    "rss_mib",
    "rss_after",
)


def run(args: argparse.Namespace) -> int:
    counts = [int(c) for c in str(args.tenants).split(",") if c]
    settings = {"both": (True, False), "true": (True,), "false": (False,)}[args.histograms]
    if args.legacy:
        settings = (True,)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for count in counts:
        for histograms in settings:
            result = asyncio.run(one_run(count, histograms, args))
            print("| " + " | ".join(str(result[c]) for c in COLUMNS) + " |", flush=True)
            if args.json:
                print(json.dumps(result), flush=True)
    print(
        f"token endpoint {args.token_delay * 1000:.0f} ms per token; {args.scrapes} scrapes; "
        f"{os.cpu_count()} cores shared by the proxy, the simulator and this script"
    )
    return 0


def _simulator(port: int, count: int, token_delay: float) -> None:
    """The bundled simulator with this run's tenants, recording when each token request arrives."""
    from aiohttp import web

    from st_proxy.devtools.simulator import SimTenant, Simulator

    arrivals: list[float] = []

    @web.middleware
    async def record(request: web.Request, handler):
        if request.path == "/connect/token":
            arrivals.append(time.time())
        return await handler(request)

    async def token_times(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def main() -> None:
        tenants = [SimTenant(t, f"cid.scale{i}", f"cs.scale-{i}") for i, t in enumerate(tenant_ids(count))]
        sim = Simulator(tenants=tenants, app_keys=(APP_KEY,))
        sim.token_delay = token_delay
        sim.app.middlewares.append(record)
        sim.app.router.add_get("/_bench/token-times", token_times)
        await sim.start("127.0.0.1", port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await sim.stop()

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_simulator":
        _simulator(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        raise SystemExit(0)
    cli = argparse.ArgumentParser(description=HELP)
    add_arguments(cli)
    raise SystemExit(run(cli.parse_args()))
