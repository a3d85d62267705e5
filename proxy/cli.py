"""The command line: argument parsing, exit codes, and running the servers. Nothing else.

Exit codes: 0 clean stop, 2 bad config or usage, 1 anything else. Expected errors print one line per problem to
stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence

from aiohttp import web

from . import __version__
from . import log as logsetup
from .config import Address, Config, ConfigError, from_environment, from_mapping, load_file, parse_address, summary

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
log = logging.getLogger("st_proxy.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-proxy", description="Credential-injecting proxy for the ServiceTitan API")
    parser.add_argument("--version", action="version", version=f"st-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file (default: $ST_PROXY_CONFIG, else the ST_* environment)")
    serve.add_argument("--log-format", choices=("json", "text"), default="json")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    check = sub.add_parser("check-config", help="validate the config and print a redacted summary")
    check.add_argument("--config", help="YAML config file (default: $ST_PROXY_CONFIG, else the ST_* environment)")

    demo = sub.add_parser("demo", help="run the bundled simulator with the proxy in front of it (offline)")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="data port (default 127.0.0.1:8080)")
    demo.add_argument("--admin-listen", default="127.0.0.1:9090", help="admin port (default 127.0.0.1:9090)")
    demo.add_argument("--token-ttl", type=float, default=900, help="simulator token lifetime in seconds")

    sim = sub.add_parser("simulate", help="run the ServiceTitan simulator alone")
    sim.add_argument("--listen", default="127.0.0.1:8900", help="HOST:PORT (default 127.0.0.1:8900)")
    sim.add_argument("--tenant", action="append", default=[], metavar="ID:CLIENT_ID:SECRET")
    sim.add_argument("--app-key", default=None)
    sim.add_argument("--token-ttl", type=float, default=900)
    return parser


class UsageError(Exception):
    pass


def load_config(path: str | None, environ: Mapping[str, str]) -> Config:
    path = path or environ.get("ST_PROXY_CONFIG")
    return load_file(path, environ) if path else from_environment(environ)


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits 2 on usage errors
    environ = os.environ if environ is None else environ
    try:
        if args.command == "check-config":
            return check_config(args.config, environ)
        if args.command == "serve":
            config = load_config(args.config, environ)
            logsetup.setup(args.log_format, args.log_level, libraries=True)
            for warning in config.warnings:
                log.warning("config: %s", warning, extra={"event": "config_warning"})
            # Reloads re-read the same file; in no-file mode the environment is fixed, so there is nothing to reload.
            reload = (lambda: load_config(args.config, environ)) if config.source is not None else None
            return _run(lambda stop: serve(config, stop, load=reload))
        if args.command == "demo":
            logsetup.setup("text", "info", sys.stderr)
            listen, admin = _address(args.listen), _address(args.admin_listen)
            return _run(lambda stop: demo(listen, admin, args.token_ttl, stop))
        if args.command == "simulate":
            from .simulator import parse_tenant_spec

            try:
                tenants = [parse_tenant_spec(spec) for spec in args.tenant]
            except ValueError as exc:
                raise UsageError(f"--tenant: {exc}") from None
            listen = _address(args.listen)
            return _run(lambda stop: simulate(listen, tenants, args.app_key, args.token_ttl, stop))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"st-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # a port in use, a file that vanished
        print(f"st-proxy: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE


def check_config(path: str | None, environ: Mapping[str, str]) -> int:
    config = load_config(path, environ)
    for line in summary(config):
        print(line)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("config ok")
    return EXIT_OK


class Stop(asyncio.Event):
    """Set by the first SIGTERM or SIGINT; ``signal`` says which one (SIGINT skips the drain delay)."""

    signal: signal.Signals | None = None


def _run(body: Callable[[Stop], object]) -> int:
    """Run ``body(stop)`` until it returns; the first SIGTERM/SIGINT sets ``stop``, a second one exits at once (1)."""

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = Stop()

        def on_signal(signum: int) -> None:
            name = signal.Signals(signum).name
            if stop.is_set():  # the second signal: the operator wants out now, in-flight requests or not
                log.warning("received %s again, exiting now", name, extra={"event": "exit_now", "signal": name})
                for handler in logging.getLogger("st_proxy").handlers:
                    handler.flush()
                os._exit(EXIT_FAILURE)
            log.info("received %s, stopping", name, extra={"event": "signal", "signal": name})
            stop.signal = signal.Signals(signum)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        return await body(stop)  # type: ignore[misc]

    return asyncio.run(runner())


async def start_site(app: web.Application, address: Address, *,
                     shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, Address]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return runner, Address(host, port)


ADMIN_SHUTDOWN_SECONDS = 1.0  # admin answers are small; a stuck scrape must not hold the exit


async def serve(config: Config, stop: asyncio.Event, on_ready: Callable[[Address, Address], None] | None = None, *,
                load: Callable[[], Config] | None = None, poll_seconds: float = 1.0) -> int:
    """Run the proxy until ``stop``, then drain (design.md section 3). ``load`` re-reads the config for reloads.

    Shutdown, on SIGTERM: /readyz answers 503 at once so load balancers and Kubernetes endpoints stop sending new
    work, while the data port keeps accepting for ``shutdown.drain_seconds`` (they take a few seconds to notice).
    Then the listener closes (new connections are refused) and aiohttp's ``AppRunner.cleanup`` closes idle
    keep-alive connections and waits up to ``shutdown.timeout_seconds`` for every in-flight request, streams
    included, before cancelling what is left (aiohttp 3.14 ``web_runner.BaseRunner.cleanup`` ->
    ``web_protocol.RequestHandler.shutdown``). The admin port stays up to the end, so probes see the 503.
    SIGINT (Ctrl-C at a terminal) skips the drain delay but still lets in-flight requests finish.
    """
    from .app import RUNTIME, create_admin_app, create_app
    from .reload import Reloader

    app = create_app(config)
    runtime = app[RUNTIME]

    async def close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
        # During the drain a kept-alive caller would keep reusing its connection to this instance; `Connection:
        # close` makes it reconnect, through the load balancer, to one that is not stopping.
        if runtime.draining:
            response.force_close()
            # aiohttp 3.14 builds the headers before this hook runs, so the header is set here too.
            response.headers["Connection"] = "close"

    app.on_response_prepare.append(close_while_draining)
    shutdown = config.shutdown  # fixed at start: a reload keeps it (reload.FIXED_AT_START)
    data_runner, data_addr = await start_site(app, config.listen, shutdown_timeout=shutdown.timeout_seconds)
    try:
        admin_runner, admin_addr = await start_site(create_admin_app(runtime), config.admin_listen,
                                                    shutdown_timeout=ADMIN_SHUTDOWN_SECONDS)
    except OSError:
        await data_runner.cleanup()
        raise
    reloader = Reloader(runtime.holder, runtime.metrics, tokens=lambda: runtime.tokens, load=load,
                        poll_seconds=poll_seconds)
    reloader.start()
    log.info("listening on %s (admin %s) for %d tenants", data_addr, admin_addr, len(config.tenants),
             extra={"event": "start", "listen": str(data_addr), "admin_listen": str(admin_addr),
                    "tenants": len(config.tenants), "watching": [str(p) for p in reloader.watched]})
    if on_ready:
        on_ready(data_addr, admin_addr)
    announce = asyncio.create_task(_log_when_ready(runtime))
    try:
        await stop.wait()
        announce.cancel()
        runtime.draining = True
        drain = 0.0 if getattr(stop, "signal", None) == signal.SIGINT else shutdown.drain_seconds
        log.info("draining: /readyz answers 503; still accepting connections for %ss", drain,
                 extra={"event": "draining", "drain_seconds": drain})
        await asyncio.sleep(drain)
        for site in list(data_runner.sites):
            await site.stop()  # closes the listening socket: new connections are refused from here on
        in_flight = len(data_runner.server.connections) if data_runner.server else 0
        log.info("listener closed; waiting up to %ss for %d open connections", shutdown.timeout_seconds, in_flight,
                 extra={"event": "listener_closed", "open_connections": in_flight,
                        "timeout_seconds": shutdown.timeout_seconds})
    finally:
        announce.cancel()
        runtime.draining = True
        await reloader.close()
        await data_runner.cleanup()  # waits up to shutdown.timeout_seconds for in-flight requests
        await admin_runner.cleanup()
        log.info("stopped", extra={"event": "stopped"})
    return EXIT_OK


async def _log_when_ready(runtime) -> None:
    """The `ready` lifecycle event, once /readyz would first answer 200. It polls the predicate /readyz uses
    rather than reach into the token manager; 50 ms is well below any load balancer's probe period."""
    while not runtime.ready():
        await asyncio.sleep(0.05)
    log.info("ready: the first token attempt has finished for every tenant", extra={"event": "ready"})


async def demo(listen: Address, admin: Address, token_ttl: float, stop: asyncio.Event) -> int:
    from .simulator import DEMO_APP_KEY, DEMO_TENANTS, Simulator

    sim = Simulator(token_ttl=token_ttl)
    await sim.start("127.0.0.1", 0)
    raw = {
        "listen": str(listen),
        "admin_listen": str(admin),
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"simulator": {"auth_url": sim.auth_url, "api_url": sim.base_url}},
        "tenants": {
            t.tenant_id: {"environment": "simulator", "client_id": t.client_id, "client_secret": {"value": t.client_secret}}
            for t in DEMO_TENANTS
        },
    }
    config = from_mapping(raw, {})

    def ready(data: Address, admin_addr: Address) -> None:
        first, second = DEMO_TENANTS[0].tenant_id, DEMO_TENANTS[1].tenant_id
        lines = [
            f"st-proxy demo: simulator at {sim.base_url}, proxy at http://{data}, admin at http://{admin_addr}",
            "The proxy holds the demo tenants' credentials; the requests below carry none. Try:",
            "",
            f"  curl -s 'http://{data}/crm/v2/tenant/{first}/customers?page=1&pageSize=2'",
            f"  curl -s -H 'X-Tenant-ID: {second}' 'http://{data}/jpm/v2/tenant/{second}/jobs/42'",
            f"  curl -s 'http://{data}/crm/v2/tenant/999/customers'    # an unknown tenant: 403 from the proxy",
            f"  curl -s 'http://{admin_addr}/tenants'",
            f"  curl -s 'http://{admin_addr}/metrics' | grep '^st_proxy_requests_total'",
            "",
            "Ctrl-C stops it.",
        ]
        print("\n".join(lines), flush=True)

    try:
        return await serve(config, stop, on_ready=ready)
    finally:
        await sim.stop()


async def simulate(listen: Address, tenants: list, app_key: str | None, token_ttl: float, stop: asyncio.Event) -> int:
    from .simulator import DEMO_APP_KEY, DEMO_TENANTS, Simulator, describe

    sim = Simulator(tenants=tuple(tenants) or DEMO_TENANTS, app_keys=(app_key or DEMO_APP_KEY,), token_ttl=token_ttl)
    await sim.start(listen.host, listen.port)
    print(describe(sim), flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()
    return EXIT_OK
