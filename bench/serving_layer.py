"""Which aiohttp layer should serve the data port: the `web.Application` (router + middleware) or `web.Server`?

Both variants run the same `create_app(config)` objects in a child process of their own (this file, run as a
script), started by `serve.start_site` as `st-proxy serve` starts its data port, with the same per-answer drain hook:
`application` serves the app through `web.AppRunner` (one catch-all route and the `unroutable` middleware), `server`
through `data_port.DataRunner`: the low-level `web.Server` calling `DataHandler.handle`, with no router, no middleware
and no `web.Request` (what `st-proxy serve` uses since this measurement, docs/serving-layer.md). Both use the
production defaults: no access log from aiohttp, the proxy's own access log line at --log-level, request bodies not
inflated.

The upstream is Debian's nginx answering a fixed --body-bytes JSON body on loopback (or the simulator with
`--upstream simulator`); tokens come from the simulator once, at prewarm. Runs are interleaved, in ABBA order per
round, each `wrk -c50 -d10s` by default after one unrecorded warm-up run per variant. For each run: req/s, p50/p99
and the proxy's CPU time per request (utime+stime from /proc/PID/stat, over the run).

    .venv/bin/python bench/run.py serving_layer [--rounds 3] [--seconds 10] [--connections 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import common
from aiohttp import web

SCENARIO = "serving_layer"
HELP = "the data port served by web.Application (router + middleware) vs the low-level web.Server, interleaved"
LAYERS = ("application", "server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both layers once (ABBA order)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk's concurrent connections")
    parser.add_argument("--warmup-seconds", type=int, default=2, help="an unrecorded wrk run per layer first")
    parser.add_argument("--upstream", choices=("nginx", "simulator"), default="nginx")
    parser.add_argument("--body-bytes", type=int, default=300, help="size of nginx's answer")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument(
        "--handler",
        choices=("proxy", "trivial"),
        default="proxy",
        help="proxy: the real data handler; trivial: a handler answering a fixed body, for the layer's own cost",
    )


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def start_nginx(procs: common.Processes, tmp: Path, body_bytes: int) -> str:
    port = common.free_port()
    filler = "x" * max(0, body_bytes - len('{"data":""}'))
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, body=f'{{"data":"{filler}"}}'))
    procs.start("nginx", ["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")])
    url = f"http://127.0.0.1:{port}"
    common.wait_http(f"{url}/crm/v2/tenant/1/ready")
    return url


def run(args: argparse.Namespace) -> int:
    if not common.have_wrk():
        print("serving_layer: wrk is not installed (apt-get install wrk)")
        return 2
    from st_proxy.devtools.simulator import DEMO_TENANTS

    path = f"/crm/v2/tenant/{DEMO_TENANTS[0].tenant_id}/customers/42"
    results: dict[str, list[tuple[common.Load, float]]] = {layer: [] for layer in LAYERS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp, common.Processes() as procs:
        sim = common.start_simulator(procs)
        api_url = start_nginx(procs, Path(tmp), args.body_bytes) if args.upstream == "nginx" else sim.url
        config = common.write_config(Path(tmp), auth_url=f"{sim.url}/connect/token", api_url=api_url)
        proxies = {
            layer: common.start_proxy(
                procs,
                config,
                argv=[sys.executable, __file__, "--child", layer, str(config), args.log_level, args.handler],
            )
            for layer in LAYERS
        }
        for layer in LAYERS:
            common.wrk(f"{proxies[layer].url}{path}", seconds=args.warmup_seconds, connections=args.connections)
        for round_ in range(args.rounds):
            order = LAYERS if round_ % 2 == 0 else tuple(reversed(LAYERS))
            for layer in order:
                pid = proxies[layer].child.pid
                before = common.cpu_seconds(pid)
                load = common.wrk(f"{proxies[layer].url}{path}", seconds=args.seconds, connections=args.connections)
                cpu_us = (common.cpu_seconds(pid) - before) / load.requests * 1e6 if load.requests else float("nan")
                results[layer].append((load, cpu_us))
                rows.append([f"round {round_ + 1} {layer}", load.rps, load.p50, load.p99, cpu_us, load.non_2xx])
    print(
        f"wrk -t2 -c{args.connections} -d{args.seconds}s GET {path} through the proxy to {args.upstream}"
        f"{f' ({args.body_bytes}-byte body)' if args.upstream == 'nginx' else ''}, proxy log level {args.log_level}, "
        f"{os.cpu_count()} cores shared by wrk, the proxies, the upstream"
        + (", TRIVIAL handler (a fixed 300-byte answer, no proxying)" if args.handler == "trivial" else "")
    )
    header = ["", "req/s", "p50 ms", "p99 ms", "CPU us/req", "non-2xx"]
    print(common.table(header, rows))
    summary = []
    for layer in LAYERS:
        loads = results[layer]
        summary.append(
            [
                f"median {layer}",
                statistics.median(load.rps for load, _ in loads),
                statistics.median(load.p50 for load, _ in loads),
                statistics.median(load.p99 for load, _ in loads),
                statistics.median(cpu for _, cpu in loads),
                sum(load.non_2xx + load.errors for load, _ in loads),
            ]
        )
    print(common.table(header, summary))
    app_rps, server_rps = summary[0][1], summary[1][1]
    app_cpu, server_cpu = summary[0][4], summary[1][4]
    print(
        f"web.Server vs web.Application: req/s {100 * (server_rps / app_rps - 1):+.1f}%, "  # type: ignore[operator]
        f"CPU per request {100 * (server_cpu / app_cpu - 1):+.1f}%"  # type: ignore[operator]
    )
    failed = sum(row[5] for row in summary)  # type: ignore[misc]
    return 0 if failed == 0 else 1


# ---- the child: one proxy served through one layer --------------------------------------------------------------


TRIVIAL_BODY = b'{"data":"' + b"x" * 289 + b'"}'  # 300 bytes, like nginx's


async def _trivial(request: web.BaseRequest) -> web.Response:
    return web.Response(body=TRIVIAL_BODY, content_type="application/json")


@web.middleware
async def _passthrough(request: web.Request, handler) -> web.StreamResponse:
    """The shape of DataHandler.unroutable: one check of the match, then the route's handler."""
    if request.match_info.http_exception is not None:
        return await _trivial(request)
    return await handler(request)


async def _serve_trivial(layer: str, stop) -> int:
    """The layer's own cost: the same two layers around a handler that answers a fixed body at once."""
    runner: web.BaseRunner
    if layer == "application":
        app = web.Application(middlewares=[_passthrough], handler_args={"auto_decompress": False})
        app.router.add_route("*", "/{tail:.*}", _trivial)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
    else:
        runner = web.ServerRunner(web.Server(_trivial, access_log=None, auto_decompress=False), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    listen = f"{host}:{port}"
    print(json.dumps({"event": "start", "listen": listen, "admin_listen": listen}), flush=True)  # /readyz: 200 too
    await stop.wait()
    await runner.cleanup()
    return 0


def _child(layer: str, config_path: str, log_level: str, handler: str) -> int:
    from st_proxy.config import Address, load_file
    from st_proxy.ops import log as logsetup
    from st_proxy.server.app import RUNTIME, create_admin_app, create_app
    from st_proxy.server.data_port import DataRunner
    from st_proxy.server.serve import run_until_signalled, start_site

    if handler == "trivial":
        return run_until_signalled(lambda stop: _serve_trivial(layer, stop))
    config = load_file(config_path, {})
    logsetup.setup("json", log_level, libraries=True)

    async def body(stop) -> int:
        app = create_app(config)
        runtime = app[RUNTIME]

        async def close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
            if runtime.draining:  # the per-answer check `st-proxy serve` adds; never true here
                response.force_close()

        app.on_response_prepare.append(close_while_draining)
        runner_class = web.AppRunner if layer == "application" else DataRunner
        loopback = Address("127.0.0.1", 0)
        runner, addr = await start_site(app, loopback, runner_class=runner_class)
        admin, admin_addr = await start_site(create_admin_app(runtime), loopback)
        print(json.dumps({"event": "start", "listen": str(addr), "admin_listen": str(admin_addr)}), flush=True)
        await stop.wait()
        await runner.cleanup()
        await admin.cleanup()
        return 0

    return run_until_signalled(body)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child" and sys.argv[2] in LAYERS:
        raise SystemExit(_child(*sys.argv[2:]))
    raise SystemExit(
        f"usage: {sys.argv[0]} --child {{{','.join(LAYERS)}}} CONFIG LOG_LEVEL HANDLER (bench/run.py starts it)"
    )
