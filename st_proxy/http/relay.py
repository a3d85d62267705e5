"""Relaying ServiceTitan's answer to the caller: status, headers and body streamed, never read whole."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..config import Tenant
from . import headers as hdrs
from .exchange import Exchange
from .send import Sender

log = logging.getLogger("st_proxy.forwarding")

CHUNK = 64 * 1024


class _Relayed(web.StreamResponse):
    """A streamed answer whose status line and headers wait for the first body bytes, so a small answer leaves in one
    write (aiohttp 3.14 does the same for ``web.Response``; older releases ignore the attribute and send at once).
    ``relay`` sends them on their own when no body bytes are at hand, so a caller never waits on a slow body for
    the status line."""

    _send_headers_immediately = False

    def send_headers(self) -> None:
        writer = self._payload_writer
        if writer is not None:
            writer.send_headers()


async def _prefixed(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in rest:
        yield chunk


def _trace_id(body: bytes) -> str | None:
    """ServiceTitan's ``traceId`` from an error body, for the access log line (support tickets ask for it)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # any bytes: JSON nested too deep for the decoder raises RecursionError
        return None
    trace = data.get("traceId") if isinstance(data, dict) else None
    return trace if isinstance(trace, str) and len(trace) <= 128 else None


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    tenant: Tenant,
    ex: Exchange,
    sender: Sender,
    head: bytes = b"",
) -> web.StreamResponse:
    """Stream ``upstream`` to the caller; ``head`` is what was already read of its body (a 401's first bytes)."""
    headers = hdrs.downstream_response_headers(upstream.headers, ex.request_id)
    headers.setdefault("Server", hdrs.SERVER)  # the upstream's own is kept; else aiohttp would add its versioned one
    response = _Relayed(status=upstream.status, reason=upstream.reason, headers=headers)
    if upstream.content_length is not None and upstream.status not in (204, 304) and upstream.status >= 200:
        response.content_length = upstream.content_length
    want_trace = upstream.status >= 400
    try:
        await response.prepare(request)
        ex.answering = True
        # What the client has already received of the body goes out with the headers; with nothing at hand yet the
        # headers go now, as a plain StreamResponse would send them.
        head = head or upstream.content.read_nowait(CHUNK)
        if not head:
            response.send_headers()
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
    except (TimeoutError, aiohttp.ClientError) as exc:
        # The status line is already on its way: all that is left is to cut the connection so the caller sees a
        # truncated answer instead of a complete-looking one.
        kind, _ = sender.failed(exc, tenant)
        log.warning(
            "upstream answer for tenant %s broke off after %d bytes (%s)",
            tenant.tenant_id,
            ex.bytes,
            type(exc).__name__,
            extra={"request_id": ex.request_id},
        )
        ex.error = f"upstream_{kind}_midstream"
        if request.transport is not None:
            request.transport.abort()
    finally:
        upstream.release()
    return response
