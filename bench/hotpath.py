"""The cost of one proxied request, side by side with nginx doing the same header injection (docs/performance.md).

Starts, on loopback:

- a fast upstream: Debian's nginx answering a fixed ``--body-bytes`` JSON body (else a bundled low-level aiohttp one,
  this file run with ``--upstream-child``);
- the simulator, for tokens only (each proxy fetches its tenants' tokens at prewarm);
- one real ``st-proxy serve`` per variant, each pinned with ``taskset`` to the last core when ``taskset`` exists, so
  CPU figures are per core:
  ``log_on`` (the JSON access log at info, the default), ``log_off`` (``--log-level warning``), ``basic`` and
  ``local_token`` (a ``clients`` section; callers send ``Authorization: Basic`` or a local token from
  ``POST /connect/token``), ``limiter`` (``limits`` with in-process state, a rate far above what the load reaches, so
  nothing waits: the difference is the limiter's work), ``redis`` (the same with ``state.redis_url``: Debian's
  ``redis-server`` on a free loopback port), ``refresh`` (a second simulator whose tokens live ``--token-ttl`` seconds,
  so the proxy refreshes them during the run: its p99 against ``log_on``'s is the refresh's cost to callers);
- nginx proxying to the same upstream and setting ``Authorization`` and ``ST-App-Key`` (``proxy_set_header``), with a
  keep-alive upstream pool, one worker, pinned like the proxies;

then drives each with wrk (else the bundled load generator) at ``--connections`` connections for ``--seconds``, the
variants interleaved, ``--rounds`` times in alternating order, after an unrecorded warm-up, and once more at one
connection (``--latency-seconds``) with the upstream asked directly too, for the latency each proxy adds. The table
gives medians over rounds: req/s, p50, p99, the proxy process's CPU per request (utime+stime from /proc/PID/stat over
the run, divided by the requests), its RSS at the end, ratios against nginx, and the p50 added at one connection.

    .venv/bin/python bench/run.py hotpath                        # 3 rounds of 5 s per variant, about 4 minutes
    .venv/bin/python bench/run.py hotpath --variants log_on,log_off --rounds 5 --seconds 10

Every load is bounded in time (and the bundled generator in count); every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import common

from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS

SCENARIO = "hotpath"
HELP = "cost per request of st-proxy variants (log, clients, limiters, token refresh) beside nginx, interleaved"

VARIANTS = ("log_on", "log_off", "basic", "local_token", "limiter", "redis", "refresh")
# On request only: log_on on the standard library's event loop instead of uvloop (ST_PROXY_LOOP=asyncio).
EXTRA_VARIANTS = ("asyncio",)
NGINX = "nginx"
CLIENT, CLIENT_SECRET = "bench-client", "bench-client-secret-0123456789abcdef"
REDIS_PASSWORD = "bench-redis-password"
TENANT = DEMO_TENANTS[0]
PATH = f"/crm/v2/tenant/{TENANT.tenant_id}/customers/42"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant once, order alternating")
    parser.add_argument("--seconds", type=int, default=5, help="length of each loaded run")
    parser.add_argument("--connections", type=int, default=50, help="concurrent connections of the loaded runs")
    parser.add_argument("--latency-seconds", type=int, default=3, help="length of each one-connection run (0: none)")
    parser.add_argument("--warmup-seconds", type=int, default=1, help="an unrecorded run per variant first")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of: {', '.join(VARIANTS + EXTRA_VARIANTS)} (asyncio: log_on on the standard loop)",
    )
    parser.add_argument("--body-bytes", type=int, default=300, help="size of the upstream's answer")
    parser.add_argument("--token-ttl", type=float, default=6, help="token lifetime for the refresh variant (seconds)")
    parser.add_argument("--no-nginx-proxy", action="store_true", help="leave out nginx as a proxy")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the proxies to one core with taskset")
    parser.add_argument(
        "--load-generator",
        choices=("wrk", "python"),
        default="wrk" if common.have_wrk() else "python",
        help="wrk when installed; python is the bundled (slower) generator",
    )
    parser.add_argument("--max-requests", type=int, default=200_000, help="bound per run for the python generator")
    parser.add_argument("--json", action="store_true", help="also print the medians as one JSON line")
    parser.add_argument(
        "--idle-tenants",
        type=int,
        default=1000,
        help="also: RSS of a proxy with this many prewarmed tenants, idle (0: no)",
    )


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # the process whose CPU is measured (None: the upstream asked directly)
    headers: dict[str, str]


# ---- upstream and nginx ------------------------------------------------------------------------------------------

NGINX_HEAD = """
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    keepalive_requests 10000000;
"""

UPSTREAM_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""

PROXY_SERVER = """
    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_set_header ST-App-Key "{app_key}";
        }}
    }}
}}
"""


def body_text(size: int) -> str:
    return '{"data":"' + "x" * max(0, size - len('{"data":""}')) + '"}'


def start_nginx(procs: common.Processes, tmp: Path, name: str, server: str, pin: list[str], **values: object) -> Target:
    port = common.free_port()
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_HEAD.format(tmp=tmp, name=name) + server.format(port=port, **values))
    child = procs.start(name, [*pin, "nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"{name}-error.log")])
    url = f"http://127.0.0.1:{port}"
    common.wait_http(f"{url}{PATH}")
    return Target(name, url, child.pid, {})


def start_upstream(procs: common.Processes, tmp: Path, body_bytes: int) -> tuple[Target, str]:
    """nginx when installed, else the bundled aiohttp upstream; (target, what it is)."""
    if shutil.which("nginx"):
        return start_nginx(procs, tmp, "upstream", UPSTREAM_SERVER, [], body=body_text(body_bytes)), "nginx"
    port = common.free_port()
    child = procs.start("upstream", [sys.executable, __file__, "--upstream-child", str(port), str(body_bytes)])
    url = f"http://127.0.0.1:{port}"
    common.wait_http(f"{url}{PATH}")
    return Target("upstream", url, child.pid, {}), "the bundled aiohttp upstream"


def upstream_child(port: int, body_bytes: int) -> None:
    """A fast upstream without nginx: aiohttp's low-level server answering every request with the same body."""
    import asyncio

    from aiohttp import web

    body = body_text(body_bytes).encode()

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def fetch_token(token_url: str, client_id: str, secret: str, basic: bool = False) -> str:
    form = {"grant_type": "client_credentials"}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if basic:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    else:
        form |= {"client_id": client_id, "client_secret": secret}
    request = urllib.request.Request(token_url, data=urllib.parse.urlencode(form).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)["access_token"]


# ---- the proxies -------------------------------------------------------------------------------------------------


def start_variant(
    procs: common.Processes,
    tmp: Path,
    variant: str,
    *,
    sim: common.Simulator,
    short_sim: common.Simulator | None,
    api_url: str,
    redis_port: int | None,
    pin: list[str],
) -> Target:
    directory = tmp / variant
    directory.mkdir()
    auth = short_sim if variant == "refresh" and short_sim else sim
    sections: dict[str, object] = {}
    if variant in ("basic", "local_token"):
        sections["clients"] = {CLIENT: {"secret": {"value": CLIENT_SECRET}, "tenants": ["*"]}}
    if variant in ("limiter", "redis"):
        sections["limits"] = {"rate_per_second": 1e9, "burst": 1_000_000, "max_concurrent_per_tenant": 10_000}
    if variant == "redis":
        (directory / "redis_password").write_text(REDIS_PASSWORD)
        sections["state"] = {
            "redis_url": f"redis://127.0.0.1:{redis_port}/0",
            "password": {"file": str(directory / "redis_password")},
        }
    # Ports chosen here: at --log-level warning the proxy does not log the `start` line that names them.
    data, admin = common.free_port(), common.free_port()
    sections |= {"listen": f"127.0.0.1:{data}", "admin_listen": f"127.0.0.1:{admin}"}
    config = common.write_config(directory, auth_url=f"{auth.url}/connect/token", api_url=api_url, **sections)
    level = "warning" if variant == "log_off" else "info"
    argv = [*pin, *common.st_proxy_command(), "serve", "--config", str(config), "--log-level", level]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ST_")}  # the config file only
    if variant == "asyncio":
        env["ST_PROXY_LOOP"] = "asyncio"
    child = procs.start(variant, argv, env=env)
    proxy = common.Proxy(child, f"http://127.0.0.1:{data}", f"http://127.0.0.1:{admin}")
    common.wait_http(f"{proxy.admin_url}/readyz")
    headers: dict[str, str] = {}
    if variant == "basic":
        headers["Authorization"] = "Basic " + base64.b64encode(f"{CLIENT}:{CLIENT_SECRET}".encode()).decode()
    elif variant == "local_token":
        token = fetch_token(f"{proxy.url}/connect/token", CLIENT, CLIENT_SECRET)
        headers["Authorization"] = f"Bearer {token}"
    # The access lines go to the child's pipe, read by a thread here; keep only the last few in memory.
    proxy.child.lines = proxy.child.lines[-50:]
    return Target(variant, proxy.url, proxy.child.pid, headers)


def idle_rss(procs: common.Processes, tmp: Path, count: int, pin: list[str]) -> tuple[float, float]:
    """(seconds until every tenant had a token, VmRSS in MiB two seconds later) for a proxy with ``count`` tenants
    and no traffic: what a replica serving that many tenants holds at rest."""
    from st_proxy.devtools.simulator import SimTenant

    tenants = [SimTenant(str(4_000_000 + i), f"cid.idle{i}", f"cs.idle-secret-{i}") for i in range(count)]
    sim = common.start_simulator(procs, *(f"--tenant={t.tenant_id}:{t.client_id}:{t.client_secret}" for t in tenants))
    directory = tmp / "idle"
    directory.mkdir()
    data, admin = common.free_port(), common.free_port()
    config = common.write_config(
        directory,
        auth_url=f"{sim.url}/connect/token",
        api_url=sim.url,
        tenants=tenants,
        listen=f"127.0.0.1:{data}",
        admin_listen=f"127.0.0.1:{admin}",
        tokens={"prewarm_rate_per_second": 500, "prewarm_concurrency": 16},
    )
    argv = [*pin, *common.st_proxy_command(), "serve", "--config", str(config), "--log-level", "warning"]
    started = time.monotonic()
    child = procs.start("idle", argv)
    deadline = started + 120
    while True:
        try:
            listed = common.get_json(f"http://127.0.0.1:{admin}/tenants")["tenants"]
            if sum(1 for t in listed if t["token"]["state"] == "valid") == count:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} tenants were not all warmed within 120 s")
        time.sleep(0.2)
    warmed = time.monotonic() - started
    time.sleep(2)
    return warmed, common.memory_kib(child.pid)["VmRSS"] / 1024


# ---- load --------------------------------------------------------------------------------------------------------


def drive(target: Target, args: argparse.Namespace, *, seconds: int, connections: int) -> tuple[common.Load, float]:
    """One bounded run; (what it saw, CPU µs per request of the target's process)."""
    before = common.cpu_seconds(target.pid) if target.pid else 0.0
    url = f"{target.url}{PATH}"
    if args.load_generator == "wrk":
        load = common.wrk(url, seconds=seconds, connections=connections, headers=target.headers)
    else:
        load = common.python_load(
            url, seconds=seconds, max_requests=args.max_requests, concurrency=connections, headers=target.headers
        )
    cpu = common.cpu_seconds(target.pid) - before if target.pid else float("nan")
    return load, (cpu / load.requests * 1e6 if load.requests else float("nan"))


def trim(procs: common.Processes) -> None:
    """Forget the proxies' access lines read so far (a long run would otherwise hold them all in memory)."""
    for child in procs.children:
        del child.lines[:-50]


def run(args: argparse.Namespace) -> int:
    variants = [v for v in str(args.variants).split(",") if v]
    unknown = set(variants) - set(VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        known = ", ".join(VARIANTS + EXTRA_VARIANTS)
        print(f"hotpath: unknown variants {', '.join(sorted(unknown))} (known: {known})")
        return 2
    if "redis" in variants and not shutil.which("redis-server"):
        print("hotpath: redis-server is not installed; leaving out the redis variant")
        variants.remove("redis")
    last_cpu = str((os.cpu_count() or 1) - 1)
    pin = ["taskset", "-c", last_cpu] if shutil.which("taskset") and not args.no_pin else []
    load_before = os.getloadavg()
    loaded: dict[str, list[tuple[common.Load, float]]] = {}
    single: dict[str, list[common.Load]] = {}
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name, common.Processes() as procs:
        tmp = Path(tmp_name)
        upstream, upstream_kind = start_upstream(procs, tmp, args.body_bytes)
        sim = common.start_simulator(procs)
        short_sim = common.start_simulator(procs, "--token-ttl", str(args.token_ttl)) if "refresh" in variants else None
        redis_port = common.start_redis(procs, tmp, REDIS_PASSWORD) if "redis" in variants else None
        targets = [
            start_variant(
                procs,
                tmp,
                v,
                sim=sim,
                short_sim=short_sim,
                api_url=upstream.url,
                redis_port=redis_port,
                pin=pin,
            )
            for v in variants
        ]
        if shutil.which("nginx") and not args.no_nginx_proxy:
            token = fetch_token(f"{sim.url}/connect/token", TENANT.client_id, TENANT.client_secret)
            upstream_port = urllib.parse.urlsplit(upstream.url).port
            targets.append(
                start_nginx(
                    procs, tmp, NGINX, PROXY_SERVER, pin, upstream_port=upstream_port, token=token, app_key=DEMO_APP_KEY
                )
            )
        direct = Target("direct", upstream.url, None, {})
        for target in targets:
            drive(target, args, seconds=args.warmup_seconds, connections=args.connections)
        for round_ in range(args.rounds):
            order = targets if round_ % 2 == 0 else list(reversed(targets))
            for target in order:
                loaded.setdefault(target.name, []).append(
                    drive(target, args, seconds=args.seconds, connections=args.connections)
                )
                trim(procs)
            if args.latency_seconds > 0:
                for target in [direct, *order]:
                    load, _ = drive(target, args, seconds=args.latency_seconds, connections=1)
                    single.setdefault(target.name, []).append(load)
                    trim(procs)
        for target in targets:
            rss[target.name] = common.memory_kib(target.pid)["VmRSS"] / 1024 if target.pid else float("nan")
        idle = idle_rss(procs, tmp, args.idle_tenants, pin) if args.idle_tenants > 0 else None
    load_after = os.getloadavg()
    return report(args, variants, loaded, single, rss, idle, upstream_kind, pin, load_before, load_after)


def report(args, variants, loaded, single, rss, idle, upstream_kind, pin, load_before, load_after) -> int:
    def med(values) -> float:
        values = [v for v in values if v == v]  # drop NaN
        return statistics.median(values) if values else float("nan")

    names = [*variants, *([NGINX] if NGINX in loaded else [])]
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        runs = loaded[name]
        summary[name] = {
            "rps": med(load.rps for load, _ in runs),
            "p50": med(load.p50 for load, _ in runs),
            "p99": med(load.p99 for load, _ in runs),
            "cpu_us": med(cpu for _, cpu in runs),
            "rss_mib": rss[name],
            "failed": sum(load.non_2xx + load.errors for load, _ in runs),
        }
        if name in single:
            summary[name]["p50_1c"] = med(load.p50 for load in single[name])
            summary[name]["added_p50_1c"] = summary[name]["p50_1c"] - med(load.p50 for load in single["direct"])
    ref = summary.get(NGINX)
    print(
        f"{args.load_generator} {args.connections} connections, {args.seconds} s per run, {args.rounds} rounds "
        f"interleaved (medians); GET {PATH} to {upstream_kind} answering {args.body_bytes} bytes; "
        f"proxies {'pinned to CPU ' + pin[-1] if pin else 'not pinned'}; {os.cpu_count()} cores; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    header = ["", "req/s", "p50 ms", "p99 ms", "CPU us/req", "RSS MiB", "x nginx req/s", "x nginx CPU", "+p50 1c ms"]
    rows = []
    for name in names:
        s = summary[name]
        rows.append(
            [
                name,
                s["rps"],
                s["p50"],
                s["p99"],
                s["cpu_us"],
                s["rss_mib"],
                f"{s['rps'] / ref['rps']:.3f}" if ref else "-",
                f"{s['cpu_us'] / ref['cpu_us']:.1f}" if ref else "-",
                f"{s['added_p50_1c']:.3f}" if "added_p50_1c" in s else "-",
            ]
        )
    print(common.table(header, rows))
    if single.get("direct"):
        print(f"direct to the upstream at 1 connection: p50 {med(load.p50 for load in single['direct']):.3f} ms")
    if "refresh" in summary and "log_on" in summary:
        print(
            f"token refresh every {args.token_ttl / 2:g} s: p99 {summary['refresh']['p99']:.2f} ms "
            f"vs {summary['log_on']['p99']:.2f} ms without (log_on)"
        )
    if idle is not None:
        print(
            f"idle with {args.idle_tenants} prewarmed tenants (log_on's config otherwise): RSS {idle[1]:.1f} MiB, "
            f"every token fetched {idle[0]:.1f} s after start"
        )
    if args.json:
        print(json.dumps({"summary": summary, "idle": idle, "load_average": [load_before[0], load_after[0]]}))
    failed = sum(s["failed"] for s in summary.values())
    if failed:
        print(f"{failed:.0f} failed requests (non-2xx or socket errors)")
    return 0 if failed == 0 else 1


if __name__ == "__main__" and sys.argv[1:2] == ["--upstream-child"]:
    upstream_child(int(sys.argv[2]), int(sys.argv[3]))
