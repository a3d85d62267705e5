"""The caller's request body: kept in memory when it is small enough to replay, otherwise streamed.

Bodies are never read whole, except one that fits ``tokens.replay_body_limit_bytes`` and declared its length: that one
is kept so the request can be replayed once with a new token after an upstream 401 (docs/tokens.md).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from ..errors import RequestError
from .exchange import CallerGone

Body = bytes | aiohttp.StreamReader | None


async def read_body(request: web.Request, *, keep_up_to: int, tenant: str) -> tuple[Body, bool]:
    """(the body to send, whether it can be sent again)."""
    if not request.body_exists:
        return None, True
    length = request.content_length
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
    failed = body.exception() if isinstance(body, aiohttp.StreamReader) else None
    if failed is None:
        return None
    if isinstance(failed, OSError):  # aiohttp sets ConnectionResetError("Connection lost") on a hang-up
        return CallerGone()
    return RequestError("the request body could not be read (malformed chunked encoding?)", tenant=tenant)
