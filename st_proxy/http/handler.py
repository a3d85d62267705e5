"""The data port's handler: one caller request in, one ServiceTitan request out, the answer streamed back.

The request path, as steps (docs/architecture.md):

    check target -> route -> look up tenant -> limit -> read body -> token -> send (and replay) -> relay

Path, query, method and body are forwarded exactly as received. Every request ends in one access log line and one
count in the metrics, whatever step it ended in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

from ..config import Config
from ..errors import ProxyError, RequestError, UnknownTenant
from ..limits.limiter import Limiter
from ..ops import log as access_log
from ..ops.metrics import Metrics
from ..upstream.tokens import TokenManager
from . import headers as hdrs
from .body import read_body
from .exchange import CALLER_GONE, CallerGone, Exchange
from .limit_step import limit
from .problems import problem_response
from .relay import relay
from .replay import send_with_replay
from .routing import resolve_tenant
from .send import Sender


def _origin_form(request: web.Request) -> bool:
    """RFC 9112 section 3.2.1: ``/path?query``. Absolute-form, authority-form (CONNECT) and ``*`` are refused."""
    return request.raw_path.startswith("/") and request.method != "CONNECT"


class DataHandler:
    def __init__(
        self,
        *,
        config: Callable[[], Config],
        tokens: Callable[[], TokenManager],
        sender: Sender,
        metrics: Metrics,
        limiter: Limiter,
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._sender = sender
        self._metrics = metrics
        self._limiter = limiter

    @web.middleware
    async def unroutable(self, request: web.Request, handler) -> web.StreamResponse:
        """Send what aiohttp's router cannot match (CONNECT's authority-form target, ``OPTIONS *``) to ``handle``.

        Without this those requests get aiohttp's plain-text 404 instead of the proxy's ``invalid_request`` problem.
        """
        if request.match_info.http_exception is not None:
            return await self.handle(request)
        return await handler(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        ex = Exchange(hdrs.request_id(request.headers))
        self._metrics.in_flight.inc()
        try:
            try:
                response = await self._steps(request, ex)
            except ProxyError as error:
                ex.error = error.code
                response = problem_response(error, ex.request_id)
                if not _origin_form(request):
                    # After CONNECT, aiohttp treats what follows on the connection as tunnel bytes: close it.
                    response.force_close()
                try:
                    await response.prepare(request)
                    await response.write_eof()
                    ex.bytes = response.content_length or 0
                except ConnectionResetError:  # the caller left while we were refusing it
                    ex.error = "caller_disconnected"
            except CallerGone:
                ex.error = "caller_disconnected"
                response = web.Response(status=CALLER_GONE)  # aiohttp drops it quietly on the closed connection
            except asyncio.CancelledError:
                # A server run with handler_cancellation=True (aiohttp's test server does) cancels the handler when
                # the caller hangs up; otherwise only a shutdown that ran out of time does.
                transport = request.transport
                gone = transport is None or transport.is_closing()
                ex.status, ex.error = CALLER_GONE, "caller_disconnected" if gone else "cancelled"
                raise
            ex.status = response.status
            return response
        finally:
            if ex.release is not None:  # the limit step's concurrency slot, held until the answer was relayed
                ex.release()
            self._finish(request, ex, time.perf_counter() - started)

    async def _steps(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        config = self._config()  # one config for the whole request, even if a reload swaps it meanwhile
        # Only origin-form targets: an absolute-form target or CONNECT could aim the proxy at another host.
        if not _origin_form(request):
            raise RequestError("only origin-form request targets (/path?query) are accepted; no CONNECT")
        # Until routing settles on one tenant the log line and metrics name none: a mismatch names two.
        tenant_id = resolve_tenant(request.path, request.headers, config.routing)
        ex.tenant = tenant_id
        tenant = config.tenants.get(tenant_id)
        if tenant is None:
            raise UnknownTenant(f"tenant {tenant_id} has no credentials configured here", tenant=tenant_id)
        admission = await limit(self._limiter, request, config, tenant, ex)
        body, replayable = await read_body(
            request, keep_up_to=config.tokens.replay_body_limit_bytes, tenant=tenant.tenant_id
        )
        tokens = self._tokens()
        token = await tokens.get(tenant)
        upstream, head = await admission.send(  # an upstream 429 holds the budget (docs/limits.md)
            lambda: send_with_replay(
                self._sender, tokens, self._metrics, request, config, tenant, token, body, replayable, ex
            ),
            replayable=replayable,
        )
        return await relay(request, upstream, tenant, ex, self._sender, head=head)

    def _finish(self, request: web.Request, ex: Exchange, seconds: float) -> None:
        self._metrics.in_flight.dec()
        self._metrics.request_done(ex.tenant, request.method, ex.status, seconds)
        fields: dict[str, object] = dict(
            request_id=ex.request_id,
            tenant=ex.tenant,
            method=request.method,
            path=request.path,
            status=ex.status,
            duration_ms=round(seconds * 1000, 2),
            upstream_ms=ex.upstream_ms,
            bytes=ex.bytes,
        )
        if ex.error:
            fields["error"] = ex.error
        if ex.trace_id:
            fields["trace_id"] = ex.trace_id
        access_log.access(**fields)
