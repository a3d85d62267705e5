"""The data port's handler: one caller request in, one ServiceTitan request out, the answer streamed back.

The request path, as steps (docs/architecture.md):

    require header -> check target -> authenticate -> route -> authorize -> look up tenant -> limit -> read body
    -> token -> send (and replay) -> relay

``POST /connect/token`` is answered by the local token endpoint (inbound/token_endpoint.py), never forwarded.

Path, query, method and body are forwarded exactly as received. Every request ends in one access log line and one
count in the metrics, whatever step it ended in.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable

from aiohttp import web

from ..config import Config
from ..errors import ProxyError, UnknownTenant
from ..inbound import token_endpoint
from ..inbound.gate import TOKEN_PATH, Inbound
from ..limits.limiter import Limiter
from ..ops import log as access_log
from ..ops.metrics import Metrics
from ..tls.tunnel_context import tunnel_host
from ..upstream.tokens import TokenManager
from . import headers as hdrs
from .body import read_body
from .exchange import CALLER_GONE, CallerGone, Exchange
from .inflight import InFlight
from .limit_step import limit
from .problems import problem_response
from .relay import relay
from .replay import send_with_replay
from .routing import resolve_tenant
from .send import Sender
from .target import check_target, origin_form

log = logging.getLogger("st_proxy.handler")
SHUTDOWN_CUT = 503  # logged and counted for a request the shutdown cut off; like 499, never sent


def where(exc: BaseException) -> str:
    """The traceback's frames and the exception's class, without its message or any local variable: a message can
    quote whatever value the failing code held (a header, a token)."""
    frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    return f"Traceback (most recent call last):\n{frames}{type(exc).__module__}.{type(exc).__qualname__}"


class DataHandler:
    def __init__(
        self,
        *,
        config: Callable[[], Config],
        tokens: Callable[[], TokenManager],
        sender: Sender,
        metrics: Metrics,
        inbound: Inbound,
        limiter: Limiter,
        in_flight: InFlight | None = None,
    ) -> None:
        self._inbound = inbound
        self._config = config
        self._tokens = tokens
        self._sender = sender
        self._metrics = metrics
        self._in_flight = in_flight or InFlight()
        self._limiter = limiter

    @web.middleware
    async def unroutable(self, request: web.Request, handler) -> web.StreamResponse:
        """Send what aiohttp's router cannot match (CONNECT's authority-form target, ``OPTIONS *``) to ``handle``.

        Without this those requests get aiohttp's plain-text 404 instead of the proxy's ``invalid_request`` problem.
        Only the Application's router needs it: `st-proxy serve` calls ``handle`` for every target through the
        low-level server (server/data_port.py, docs/serving-layer.md).
        """
        if request.match_info.http_exception is not None:
            return await self.handle(request)
        return await handler(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        ex = Exchange(hdrs.request_id(request.headers))
        self._metrics.in_flight.inc()
        self._in_flight.enter()
        try:
            try:
                response = await self._steps(request, ex)
            except ProxyError as error:
                response = await self._refuse(request, ex, error)
            except CallerGone:
                ex.error = "caller_disconnected"
                response = web.Response(status=CALLER_GONE)  # aiohttp drops it quietly on the closed connection
            except asyncio.CancelledError:
                # The server runs with handler_cancellation=True: the handler is cancelled when the caller hangs up,
                # and by a shutdown whose timeout ran out, which serve() marks first (http/inflight.py).
                if self._in_flight.cut_off:
                    ex.status, ex.error = SHUTDOWN_CUT, "shutdown"
                else:
                    transport = request.transport
                    gone = transport is None or transport.is_closing()
                    ex.status, ex.error = CALLER_GONE, "caller_disconnected" if gone else "cancelled"
                raise
            except Exception as exc:  # a bug: answered as a problem like any other error, never aiohttp's text page
                response = await self._failed(request, ex, exc)
            ex.status = response.status
            return response
        finally:
            self._in_flight.leave()
            if ex.release is not None:  # the limit step's concurrency slot, held until the answer was relayed
                ex.release()
            self._finish(request, ex, time.perf_counter() - started)

    async def _steps(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        config = self._config()  # one config for the whole request, even if a reload swaps it meanwhile
        # require_header first: SSRF payloads rarely control headers (docs/security.md). Inside a forward-proxy
        # tunnel the CONNECT handshake stands for the header: the app's library cannot be made to add one.
        if tunnel_host(request) is None:
            # The path as sent: aiohttp's request.path decodes %2F, and /connect%2Ftoken is not the token endpoint.
            self._inbound.check_header(request.raw_path.partition("?")[0], request.headers, config)
        path = check_target(request)  # the path as sent, decoded; never a normalised one
        if path == TOKEN_PATH:
            return await token_endpoint.answer(request, config, self._inbound, ex)
        client = self._inbound.authenticate(request.headers.getall("Authorization", []), config, ex)
        # Until routing settles on one tenant the log line and metrics name none: a mismatch names two.
        tenant_id = resolve_tenant(path, request.headers, config.routing)
        ex.tenant = tenant_id
        self._inbound.authorize(client, tenant_id, config)
        tenant = config.tenants.get(tenant_id)
        if tenant is None:
            raise UnknownTenant(f"tenant {tenant_id} has no credentials configured here", tenant=tenant_id)
        admission = await limit(self._limiter, request, config, tenant, ex)
        body, replayable = await read_body(
            request,
            keep_up_to=config.tokens.replay_body_limit_bytes,
            tenant=tenant.tenant_id,
            limit=config.security.max_body_bytes,
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

    async def _refuse(self, request: web.Request, ex: Exchange, error: ProxyError) -> web.StreamResponse:
        ex.error = error.code
        response = problem_response(error, ex.request_id)
        if not origin_form(request):
            # After CONNECT, aiohttp treats what follows on the connection as tunnel bytes: close it.
            response.force_close()
        try:
            await response.prepare(request)
            await response.write_eof()
            ex.bytes = response.content_length or 0
        except ConnectionResetError:  # the caller left while we were refusing it
            ex.error = "caller_disconnected"
        return response

    async def _failed(self, request: web.Request, ex: Exchange, exc: Exception) -> web.StreamResponse:
        """An unexpected exception: logged once with where it happened, answered 500 ``internal_error``."""
        log.error(
            "request %s failed inside the proxy (%s)",
            ex.request_id,
            type(exc).__name__,
            extra={"event": "internal_error", "request_id": ex.request_id, "exception": where(exc)},
        )
        if ex.answering:  # the status line is already sent: all that is left is to cut the connection
            ex.error = "internal_error"
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        return await self._refuse(request, ex, ProxyError("the proxy failed while handling this request"))

    def _finish(self, request: web.Request, ex: Exchange, seconds: float) -> None:
        self._metrics.in_flight.dec()
        self._metrics.request_done(ex.tenant, request.method, ex.status, seconds)
        self._inbound.observe(ex, self._config())
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
        if ex.client:  # with clients configured: who made the request (docs/security.md)
            fields["client"] = ex.client
        if ex.error:
            fields["error"] = ex.error
        if ex.trace_id:
            fields["trace_id"] = ex.trace_id
        access_log.access(**fields)
