"""create_app: the only place where the proxy's objects are wired together.

Every dependency a test may replace is a keyword argument with a production default (``clock``, ``registry``,
``rng``). The client sessions live in the data app's cleanup context: created on start-up, closed on clean-up.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from ..config import Config, UpstreamConfig
from ..http.handler import DataHandler
from ..http.headers import NO_AUTO_HEADERS, server_header
from ..http.send import Sender
from ..inbound.gate import INBOUND, Inbound
from ..limits.budget import LocalBudgets
from ..limits.limiter import Limiter
from ..limits.state import PacingState
from ..ops.admin import create_admin_app
from ..ops.metrics import Metrics
from ..upstream.egress import EgressProxies
from ..upstream.token_client import TokenClient
from ..upstream.tokens import TokenManager
from .reload import ConfigHolder
from .runtime import RUNTIME, Runtime

__all__ = ["DATA_HANDLER", "RUNTIME", "create_admin_app", "create_app"]

# The data port's request handler: server/data_port.DataRunner serves it without the router (docs/serving-layer.md).
DATA_HANDLER = web.AppKey("data_handler", DataHandler)


def _session(
    upstream: UpstreamConfig, *, limit: int, read_timeout: float, decompress: bool = False
) -> aiohttp.ClientSession:
    ssl_context: ssl.SSLContext | bool = True
    if upstream.ca_file:
        ssl_context = ssl.create_default_context()
        ssl_context.load_verify_locations(cafile=upstream.ca_file)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=ssl_context),
        # `connect` bounds the wait for a pooled connection plus connecting: without it a request queued behind
        # max_connections slow exports waits forever, holding a token that may pass its expiry meanwhile (the default
        # 10 s stays inside the 30 s expiry skew).
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=upstream.connect_timeout_seconds,
            sock_connect=upstream.connect_timeout_seconds,
            sock_read=read_timeout,
        ),
        cookie_jar=aiohttp.DummyCookieJar(),  # one caller's cookies must never reach another (docs/forwarding.md)
        # API answers: Content-Encoding passes through untouched. Token answers are read here, and aiohttp asks for
        # gzip on them (its default Accept-Encoding), so the token session must inflate what it asked for.
        auto_decompress=decompress,
        trust_env=False,  # HTTPS_PROXY / NO_PROXY come from egress.EgressProxies, resolved once per base URL
        # API requests carry the caller's own headers and none that aiohttp would invent (http/headers.py). Set on the
        # session, not per request: aiohttp turns a per-request list into a new set on every call.
        skip_auto_headers=None if decompress else NO_AUTO_HEADERS,
    )


def create_app(
    config: Config,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    prewarm: bool = True,
    environ: Mapping[str, str] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> web.Application:
    """The data-plane app. ``create_admin_app(app[RUNTIME])`` gives its admin app.

    ``sleep`` is how prewarm waits for its turn (``upstream/pacing.py``) and how a request waits for a rate or
    concurrency slot (``limits/``): a test pairs it with its ``clock``.
    """
    tenant_histograms = config.metrics.tenant_histograms  # fixed at start (reload.FIXED_AT_START)
    metrics = Metrics(registry, clock=clock, tenant_histograms=tenant_histograms)
    runtime = Runtime(ConfigHolder(config), metrics, clock=clock)
    state = config.state  # fixed at start (reload.FIXED_AT_START)
    limiter = Limiter(
        PacingState(
            LocalBudgets(clock), timeout=state.timeout_ms / 1000, fallback_fraction=state.fallback_rate_fraction
        ),
        runtime.metrics,
        clock=clock,
        sleep=sleep,
        tenant_histograms=tenant_histograms,
    )
    if config.limits is not None:
        limiter.ensure_metrics()  # the limits' series exist from the first scrape
    egress = EgressProxies(os.environ if environ is None else environ)
    runtime.metrics.set_tenants(config.tenants)
    runtime.metrics.clients.set_clients(config.clients)
    # Registered before start, so every configured tenant has an expiry series (0) from the first scrape.
    runtime.metrics.watch_expiries(lambda: _expiries(runtime))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        current = runtime.holder.current
        runtime.api_session = _session(
            current.upstream, limit=current.upstream.max_connections, read_timeout=current.upstream.read_timeout_seconds
        )
        # Token requests get their own pool so they never queue behind slow export downloads.
        runtime.token_session = _session(
            current.upstream, limit=0, read_timeout=current.tokens.fetch_timeout_seconds, decompress=True
        )
        client = TokenClient(
            runtime.token_session,
            client_auth=current.tokens.client_auth,
            scope=current.tokens.scope,
            clock=clock,
            egress=egress,
        )
        runtime.tokens = TokenManager(
            client, current.tokens, clock=clock, observer=runtime.metrics, rng=rng, sleep=sleep
        )
        runtime.ready_by = clock() + current.tokens.prewarm_ready_seconds
        if state.redis_url:
            from ..limits import redis_state  # the redis package is imported only when state is shared

            await limiter.state.start(redis_state.RedisBudgets(redis_state.client(state), state.key_prefix))
        warm = asyncio.create_task(runtime.tokens.prewarm(current.tenants.values())) if prewarm else None
        if not prewarm:
            runtime.tokens.skip_prewarm(current.tenants.values())
        yield
        if warm is not None:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
        await runtime.tokens.close()
        await limiter.state.close()
        await runtime.api_session.close()
        await runtime.token_session.close()

    handler = DataHandler(
        config=lambda: runtime.holder.current,
        tokens=lambda: _require(runtime.tokens),
        sender=Sender(session=lambda: _require(runtime.api_session), metrics=runtime.metrics, egress=egress),
        metrics=runtime.metrics,
        inbound=(inbound := Inbound(metrics=runtime.metrics.clients, clock=clock)),
        in_flight=runtime.in_flight,
        limiter=limiter,
    )
    # auto_decompress=False: aiohttp's server otherwise inflates a gzip request body before the handler sees it, and
    # the proxy would forward plain bytes under the caller's `Content-Encoding: gzip` (bodies pass untouched).
    app = web.Application(middlewares=[handler.unroutable], handler_args={"auto_decompress": False})
    app.on_response_prepare.append(server_header)
    app[RUNTIME] = runtime
    app[INBOUND] = inbound
    app[DATA_HANDLER] = handler
    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    return app


def _require(value):
    if value is None:
        raise RuntimeError("the proxy app is not started")
    return value


def _expiries(runtime: Runtime):
    manager = runtime.tokens  # read, never create, cache entries: a scrape must not change state
    for tenant in runtime.holder.current.tenants.values():
        yield tenant.tenant_id, manager.status(tenant).expires_at if manager else None
