"""The streaming handler: one caller request in, one ServiceTitan request out, the answer streamed back.

Path, query, method and body are forwarded exactly as received (design.md section 1). Bodies are never read whole,
except one that fits ``tokens.replay_body_limit_bytes`` and declared its length: that one is kept so the request can be
replayed once with a new token after an upstream 401 (design.md section 2).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from yarl import URL

from . import headers as hdrs
from . import log as access_log
from .config import Config, Tenant
from .egress import DIRECT
from .errors import (
    ProxyError,
    RequestError,
    UnknownTenant,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
    problem_response,
)
from .metrics import Metrics
from .routing import resolve_tenant
from .token_client import Token
from .tokens import TokenManager

log = logging.getLogger("st_proxy.forwarding")

CHUNK = 64 * 1024
APP_KEY_TITLE = "Application key"  # ServiceTitan's app-key 401s: a new token cannot fix them (servicetitan.md)
ERROR_BODY_LIMIT = 64 * 1024


CALLER_GONE = 499  # nginx's "client closed request": logged and counted, never sent (nobody is listening)


class _CallerGone(Exception):
    """The caller hung up before the exchange finished. Not a ProxyError: there is nobody left to answer."""


def _body_failure(body: object, tenant: str) -> Exception | None:
    """If the caller's streamed body broke (the caller hung up, or sent a malformed body), the error to raise.

    aiohttp's client reports a failure of the body it was sending as an error of the upstream connection; this tells
    the two apart, so an upload cut off by the caller is never counted against ServiceTitan.
    """
    failed = body.exception() if isinstance(body, aiohttp.StreamReader) else None
    if failed is None:
        return None
    if isinstance(failed, OSError):  # aiohttp sets ConnectionResetError("Connection lost") on a hang-up
        return _CallerGone()
    return RequestError("the request body could not be read (malformed chunked encoding?)", tenant=tenant)


class _Exchange:
    """What the access log line and the metrics need to know about one request."""

    __slots__ = ("tenant", "status", "error", "upstream_ms", "bytes", "trace_id")

    def __init__(self) -> None:
        self.tenant: str | None = None
        self.status = 500
        self.error: str | None = None
        self.upstream_ms: float | None = None
        self.bytes = 0
        self.trace_id: str | None = None


def _upstream_failure(exc: BaseException, tenant: str) -> tuple[str, UpstreamError]:
    """Map a client exception to (metric kind, proxy error)."""
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's ServerTimeoutError and ConnectionTimeoutError
        return "timeout", UpstreamTimeout("the ServiceTitan API did not answer in time", tenant=tenant)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect", UpstreamUnreachable("cannot connect to the ServiceTitan API", tenant=tenant)
    return "reset", UpstreamUnreachable("the ServiceTitan API closed the connection", tenant=tenant)


def _origin_form(request: web.Request) -> bool:
    """RFC 9112 section 3.2.1: ``/path?query``. Absolute-form, authority-form (CONNECT) and ``*`` are refused."""
    return request.raw_path.startswith("/") and request.method != "CONNECT"


async def _prefixed(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


def _trace_id(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    trace = data.get("traceId") if isinstance(data, dict) else None
    return trace if isinstance(trace, str) and len(trace) <= 128 else None


class Forwarder:
    def __init__(
        self,
        *,
        config: Callable[[], Config],
        tokens: Callable[[], TokenManager],
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        egress: Callable[[str], URL | None] = lambda url: DIRECT,
    ) -> None:
        self._egress = egress
        self._config = config
        self._tokens = tokens
        self._session = session
        self._metrics = metrics

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
        request_id = hdrs.request_id(request.headers)
        ex = _Exchange()
        self._metrics.in_flight.inc()
        try:
            try:
                response = await self._route_and_forward(request, request_id, ex)
            except ProxyError as error:
                ex.error = error.code
                response = problem_response(error, request_id)
                if not _origin_form(request):
                    # After CONNECT, aiohttp treats what follows on the connection as tunnel bytes: close it.
                    response.force_close()
                try:
                    await response.prepare(request)
                    await response.write_eof()
                    ex.bytes = len(response.body or b"")
                except ConnectionResetError:  # the caller left while we were refusing it
                    ex.error = "caller_disconnected"
            except _CallerGone:
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
            seconds = time.perf_counter() - started
            self._metrics.in_flight.dec()
            self._metrics.request_done(ex.tenant, request.method, ex.status, seconds)
            fields = dict(
                request_id=request_id, tenant=ex.tenant, method=request.method, path=request.path,
                status=ex.status, duration_ms=round(seconds * 1000, 2), upstream_ms=ex.upstream_ms, bytes=ex.bytes,
            )
            if ex.error:
                fields["error"] = ex.error
            if ex.trace_id:
                fields["trace_id"] = ex.trace_id
            access_log.access(**fields)

    async def _route_and_forward(self, request: web.Request, request_id: str, ex: _Exchange) -> web.StreamResponse:
        config = self._config()  # one config for the whole request, even if a reload swaps it meanwhile
        # Only origin-form targets: an absolute-form target or CONNECT could aim the proxy at another host
        # (design.md section 4).
        if not _origin_form(request):
            raise RequestError("only origin-form request targets (/path?query) are accepted; no CONNECT")
        # Until routing settles on one tenant the log line and metrics name none: a mismatch names two.
        tenant_id = resolve_tenant(request.path, request.headers, config.routing)
        ex.tenant = tenant_id
        tenant = config.tenants.get(tenant_id)
        if tenant is None:
            raise UnknownTenant(f"tenant {tenant_id} has no credentials configured here", tenant=tenant_id)
        return await self._forward(request, config, tenant, request_id, ex)

    async def _forward(
        self, request: web.Request, config: Config, tenant: Tenant, request_id: str, ex: _Exchange
    ) -> web.StreamResponse:
        tokens = self._tokens()
        body: bytes | aiohttp.StreamReader | None = None
        replayable = True
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= config.tokens.replay_body_limit_bytes:
                try:
                    body = await request.content.readexactly(length)
                except asyncio.IncompleteReadError:
                    raise RequestError("the request body ended before its Content-Length", tenant=tenant.tenant_id)
                except OSError:  # the caller hung up mid-body (aiohttp sets ConnectionResetError)
                    raise _CallerGone() from None
                except web.RequestPayloadError:
                    raise RequestError("the request body could not be read", tenant=tenant.tenant_id) from None
            else:
                body, replayable = request.content, False
        url = URL(tenant.environment.api_url + request.raw_path, encoded=True)  # no re-encoding (design.md 6)

        token = await tokens.get(tenant)
        upstream = await self._send(request, config, tenant, token, url, body, request_id, ex)
        if upstream.status != 401:
            return await self._relay(request, upstream, tenant, request_id, ex)
        # -- 401 replay (issue 3; owned by the token lifecycle) --
        # Upstream 401 (design.md section 2). Read the problem body (bounded: ServiceTitan's are a few hundred bytes)
        # to tell an app-key 401, which a new token cannot fix, from a token 401.
        error_body = b""
        try:
            while len(error_body) < ERROR_BODY_LIMIT:
                chunk = await upstream.content.read(ERROR_BODY_LIMIT - len(error_body))
                if not chunk:
                    break
                error_body += chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            upstream.release()
            raise self._upstream_failed(exc, tenant)[1] from None
        if upstream.content.at_eof():
            upstream.release()  # free the pool slot before waiting on a token: other tenants must not queue behind
        try:
            problem = json.loads(error_body)
        except ValueError:
            problem = None
        title = problem.get("title") if isinstance(problem, dict) else None
        if isinstance(title, str) and title.startswith(APP_KEY_TITLE):
            return await self._relay(request, upstream, tenant, request_id, ex, head=error_body)
        # Dropped only if it is still the current token (identity): a 401 for an old token keeps a newer one. Also
        # when this request cannot be replayed, so that the next one gets a fresh token.
        tokens.invalidate(tenant, token)
        if not replayable:  # the body was streamed upstream and is gone: the caller gets the 401 and may retry
            return await self._relay(request, upstream, tenant, request_id, ex, head=error_body)
        try:
            fresh = await tokens.get(tenant)  # through the same single flight as every other caller
        except ProxyError:
            upstream.release()
            raise
        if fresh is token:  # no newer token to try (tokens.INVALIDATE_MIN_INTERVAL): a replay would be the same
            return await self._relay(request, upstream, tenant, request_id, ex, head=error_body)
        upstream.release()
        tokens.record_replay(tenant)
        self._metrics.token_replayed(tenant.tenant_id)
        upstream = await self._send(request, config, tenant, fresh, url, body, request_id, ex)
        return await self._relay(request, upstream, tenant, request_id, ex)  # a second 401 goes back as it is

    async def _send(
        self,
        request: web.Request,
        config: Config,
        tenant: Tenant,
        token: Token,
        url: URL,
        body: bytes | aiohttp.StreamReader | None,
        request_id: str,
        ex: _Exchange,
    ) -> aiohttp.ClientResponse:
        out_headers = hdrs.upstream_request_headers(
            request.headers,
            tenant_header=config.routing.tenant_header,
            authorization=config.tokens.authorization_prefix + token.access_token,
            app_key=tenant.app_key.reveal(),
            request_id=request_id,
        )
        proxy = self._egress(tenant.environment.api_url)
        sent = time.perf_counter()
        try:
            upstream = await self._session().request(
                request.method, url, headers=out_headers, data=body, allow_redirects=False,
                skip_auto_headers=hdrs.NO_AUTO_HEADERS, proxy=proxy,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            caller_side = _body_failure(body, tenant.tenant_id)
            if caller_side is not None:
                raise caller_side from None
            kind, error = self._upstream_failed(exc, tenant)
            log.debug("upstream failure for tenant %s: %s", tenant.tenant_id, type(exc).__name__)
            raise error from None
        ex.upstream_ms = round((time.perf_counter() - sent) * 1000, 2)
        return upstream

    def _upstream_failed(self, exc: BaseException, tenant: Tenant) -> tuple[str, UpstreamError]:
        """Count a failed exchange with ServiceTitan; (metric kind, the error to answer with)."""
        kind, error = _upstream_failure(exc, tenant.tenant_id)
        self._metrics.upstream_error(tenant.tenant_id, kind)
        return kind, error

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, tenant: Tenant, request_id: str, ex: _Exchange,
        head: bytes = b"",
    ) -> web.StreamResponse:
        """Stream ``upstream`` to the caller; ``head`` is what was already read of its body (a 401's first bytes)."""
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason,
            headers=hdrs.downstream_response_headers(upstream.headers, request_id),
        )
        if upstream.content_length is not None and upstream.status not in (204, 304) and upstream.status >= 200:
            response.content_length = upstream.content_length
        want_trace = upstream.status >= 400
        try:
            await response.prepare(request)
            async for chunk in _prefixed(head, upstream.content.iter_chunked(CHUNK)):
                if want_trace and ex.bytes == 0:
                    ex.trace_id = _trace_id(chunk)
                ex.bytes += len(chunk)
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            # Writing to the caller failed: it hung up. First, because aiohttp's ClientConnectionResetError is both a
            # ConnectionResetError and a ClientError, and this one is not ServiceTitan's fault.
            ex.error = "caller_disconnected"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # The status line is already on its way: all that is left is to cut the connection so the caller sees a
            # truncated answer instead of a complete-looking one.
            kind, _ = self._upstream_failed(exc, tenant)
            log.warning("upstream answer for tenant %s broke off after %d bytes (%s)", tenant.tenant_id, ex.bytes,
                        type(exc).__name__, extra={"request_id": request_id})
            ex.error = f"upstream_{kind}_midstream"
            if request.transport is not None:
                request.transport.abort()
        finally:
            upstream.release()
        return response
