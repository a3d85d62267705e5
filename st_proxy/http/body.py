"""The caller's request body: kept in memory when it is small enough to replay, otherwise streamed.

Bodies are never read whole, except one that fits ``tokens.replay_body_limit_bytes`` and declared its length: that one
is kept so the request can be replayed once with a new token after an upstream 401 (docs/tokens.md).

``security.max_body_bytes`` (docs/security.md): a declared ``Content-Length`` over it is refused before anything is
sent upstream; a chunked body is streamed through ``LimitedBody``, which fails the upload as soon as the limit is
passed. aiohttp's client writes the final zero-length chunk only after the body iterator finishes (RFC 9112 section
7.1), so a failed iterator leaves the upstream with an unterminated chunked body on a closed connection: it can never
take the part it got for a complete request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from ..errors import BodyTooLarge, RequestError
from .exchange import CallerGone


class LimitedBody:
    """A streamed body that fails past ``limit`` bytes; ``exceeded`` says whether that is why the upload failed."""

    def __init__(self, stream: aiohttp.StreamReader, limit: int, tenant: str) -> None:
        self.stream = stream
        self.limit = limit
        self.tenant = tenant
        self.exceeded = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.stream.iter_any():
            seen += len(chunk)
            if seen > self.limit:
                self.exceeded = True
                raise too_large(self.limit, self.tenant)
            yield chunk


Body = bytes | aiohttp.StreamReader | LimitedBody | None


def too_large(limit: int, tenant: str) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is larger than this proxy accepts ({limit} bytes)", tenant=tenant)


async def read_body(
    request: web.Request, *, keep_up_to: int, tenant: str, limit: int | None = None
) -> tuple[Body, bool]:
    """(the body to send, whether it can be sent again). ``limit``: security.max_body_bytes."""
    if not request.body_exists:
        return None, True
    length = request.content_length
    if limit is not None and length is not None and length > limit:
        raise too_large(limit, tenant)  # declared: refused before anything is sent
    if length is None and limit is not None:
        return LimitedBody(request.content, limit, tenant), False
    if length is None or length > keep_up_to:
        return request.content, False
    try:
        return await request.content.readexactly(length), True
    except asyncio.IncompleteReadError:
        raise RequestError("the request body ended before its Content-Length", tenant=tenant) from None
    except OSError:  # the caller hung up mid-body (aiohttp sets ConnectionResetError)
        raise CallerGone() from None
    except web.RequestPayloadError:
        raise RequestError("the request body could not be read", tenant=tenant) from None


def body_failure(body: Body, tenant: str) -> Exception | None:
    """If the caller's streamed body broke (the caller hung up, or sent a malformed body), the error to raise.

    aiohttp's client reports a failure of the body it was sending as an error of the upstream connection; this tells
    the two apart, so an upload cut off by the caller is never counted against ServiceTitan.
    """
    if isinstance(body, LimitedBody):
        if body.exceeded:
            return too_large(body.limit, tenant)
        body = body.stream
    failed = body.exception() if isinstance(body, aiohttp.StreamReader) else None
    if failed is None:
        return None
    if isinstance(failed, OSError):  # aiohttp sets ConnectionResetError("Connection lost") on a hang-up
        return CallerGone()
    return RequestError("the request body could not be read (malformed chunked encoding?)", tenant=tenant)
