"""Running the proxy's two servers: start-up, signals, and the graceful drain (docs/operations.md)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
from collections.abc import Callable, Mapping

from aiohttp import web

from ..config import Address, Config

EXIT_OK, EXIT_FAILURE = 0, 1
log = logging.getLogger("st_proxy.server")


class Stop(asyncio.Event):
    """Set by the first SIGTERM or SIGINT; ``signal`` says which one (SIGINT skips the drain delay)."""

    signal: signal.Signals | None = None


LOOP_VARIABLE = "ST_PROXY_LOOP"  # "asyncio": the standard library's event loop even where uvloop is installed


def loop_factory(environ: Mapping[str, str] = os.environ) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is importable (a dependency on Linux) and ``ST_PROXY_LOOP`` is not ``asyncio``;
    else None (asyncio's own). uvloop runs the same aiohttp code with its transports, selector and TLS in C: about
    6% less CPU per plain request here, and TLS on a kept-alive connection adds 14 µs instead of 65
    (docs/performance.md)."""
    if environ.get(LOOP_VARIABLE, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_until_signalled(body: Callable[[Stop], object]) -> int:
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

    with asyncio.Runner(loop_factory=loop_factory()) as run:
        return run.run(runner())


async def start_site(
    app: web.Application,
    address: Address,
    *,
    shutdown_timeout: float = 60.0,
    runner_class: Callable[..., web.BaseRunner] = web.AppRunner,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.BaseRunner, Address]:
    """Serve ``app`` on ``address`` through ``runner_class``: the router (web.AppRunner, the admin app) or the data
    port's low-level server (data_port.DataRunner); with ``ssl_context``, over TLS (tls/server_context.py)."""
    # handler_cancellation: a caller that hangs up cancels its handler, and with it the upstream exchange, which would
    # otherwise run on for up to read_timeout holding a pooled connection (aiohttp's default is False since 3.8.1).
    runner = runner_class(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    return runner, Address(host, port)


ADMIN_SHUTDOWN_SECONDS = 1.0  # admin answers are small; a stuck scrape must not hold the exit
# serve() itself waits shutdown.timeout_seconds for in-flight requests (http/inflight.py); aiohttp's cleanup then only
# cancels what is left. Not 0: aiohttp reads a 0 timeout as "wait forever" (helpers.ceil_timeout).
CUT_OFF_SECONDS = 0.001


async def serve(
    config: Config,
    stop: asyncio.Event,
    on_ready: Callable[[Address, Address], None] | None = None,
    *,
    load: Callable[[], Config] | None = None,
    poll_seconds: float = 1.0,
) -> int:
    """Run the proxy until ``stop``, then drain (docs/operations.md). ``load`` re-reads the config for reloads.

    Shutdown, on SIGTERM: /readyz answers 503 at once so load balancers and Kubernetes endpoints stop sending new
    work, while the data port keeps accepting for ``shutdown.drain_seconds`` (they take a few seconds to notice).
    Then the listener closes (new connections are refused), idle keep-alive connections are closed, and serve waits
    up to ``shutdown.timeout_seconds`` for every in-flight request, streams included (``http/inflight.py``). What is
    left is cut by ``DataRunner.cleanup`` (aiohttp's) and logged as status 503, error ``shutdown``, not as a caller
    that hung up (499); only then are the client sessions closed (``DataRunner``). The admin port stays up to the end,
    so probes see the 503.
    SIGINT (Ctrl-C at a terminal) skips the drain delay but still lets in-flight requests finish.
    """
    from ..tls.serving import TLSListeners
    from .app import RUNTIME, create_admin_app, create_app
    from .data_port import DataRunner
    from .reload import Reloader

    listeners = TLSListeners(config, os.environ)  # ConfigError (exit 2) before anything is bound
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
    data_runner, data_addr = await start_site(
        app,
        config.listen,
        shutdown_timeout=CUT_OFF_SECONDS,
        runner_class=DataRunner,
        ssl_context=listeners.ssl_context,
    )
    try:
        admin_runner, admin_addr = await start_site(
            create_admin_app(runtime), config.admin_listen, shutdown_timeout=ADMIN_SHUTDOWN_SECONDS
        )
    except OSError:
        await data_runner.cleanup()
        raise
    try:
        await listeners.start(lambda: runtime.holder.current, data_runner, registry=runtime.metrics.registry)
    except OSError:
        await admin_runner.cleanup()
        await data_runner.cleanup()
        raise
    reloader = Reloader(
        runtime.holder,
        runtime.metrics,
        tokens=lambda: runtime.tokens,
        load=load,
        poll_seconds=poll_seconds,
        preparers=listeners.preparers,
    )
    reloader.start()
    # What start-up built (the config, every tenant's metric series) lives as long as the process. Moved out of the
    # collector's generations it is no longer walked by each full collection: at 5,000 tenants such a walk holds the
    # event loop for ~100 ms, triggered by whatever allocates next, a scrape's render included (Python docs: gc.freeze).
    gc.collect()
    gc.freeze()
    log.info(
        "listening on %s (admin %s) for %d tenants",
        data_addr,
        admin_addr,
        len(config.tenants),
        extra={
            "event": "start",
            "listen": str(data_addr),
            "admin_listen": str(admin_addr),
            "tenants": len(config.tenants),
            "watching": [str(p) for p in reloader.watched],
            **listeners.log_fields(),
        },
    )
    if on_ready:
        on_ready(data_addr, admin_addr)
    announce = asyncio.create_task(_log_when_ready(runtime))
    try:
        await stop.wait()
        announce.cancel()
        runtime.draining = True
        drain = 0.0 if getattr(stop, "signal", None) == signal.SIGINT else shutdown.drain_seconds
        log.info(
            "draining: /readyz answers 503; still accepting connections for %ss",
            drain,
            extra={"event": "draining", "drain_seconds": drain},
        )
        await asyncio.sleep(drain)
        for site in list(data_runner.sites):
            await site.stop()  # closes the listening socket: new connections are refused from here on
        await listeners.stop_listening()
        in_flight = len(data_runner.server.connections) if data_runner.server else 0
        log.info(
            "listener closed; waiting up to %ss for %d open connections",
            shutdown.timeout_seconds,
            in_flight,
            extra={
                "event": "listener_closed",
                "open_connections": in_flight,
                "timeout_seconds": shutdown.timeout_seconds,
            },
        )
        if data_runner.server:
            data_runner.server.pre_shutdown()  # idle keep-alive connections close now, busy ones after their request
        await runtime.in_flight.wait_idle(shutdown.timeout_seconds)
    finally:
        announce.cancel()
        runtime.draining = True
        await reloader.close()
        await listeners.stop_listening()
        if runtime.in_flight.count:
            log.warning(
                "shutdown timeout: cutting %d requests still in flight",
                runtime.in_flight.count,
                extra={"event": "shutdown_cut", "requests": runtime.in_flight.count},
            )
        runtime.in_flight.cut_off = True  # from here a cancelled request was cut by us, not left by its caller
        await data_runner.cleanup()  # cancels what is still running, tunnelled requests included
        await listeners.close()
        await admin_runner.cleanup()
        log.info("stopped", extra={"event": "stopped"})
    return EXIT_OK


async def _log_when_ready(runtime) -> None:
    """The `ready` lifecycle event, once /readyz would first answer 200. It polls the predicate /readyz uses
    rather than reach into the token manager; 50 ms is well below any load balancer's probe period."""
    while not runtime.ready():  # noqa: ASYNC110 (a predicate, not an event: see the docstring)
        await asyncio.sleep(0.05)
    pending = len(runtime.pending_tenants())
    if pending:
        log.info(
            "ready: tokens.prewarm_ready_seconds passed; prewarm continues in the background for %d tenants",
            pending,
            extra={"event": "ready", "prewarm_pending": pending},
        )
    else:
        log.info("ready: the first token attempt has finished for every tenant", extra={"event": "ready"})
