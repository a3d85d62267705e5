"""What travels and what does not: the one place that decides which headers are stripped and which are added."""

from __future__ import annotations

import functools
import itertools
import os
import re

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 section 7.6.1: connection-specific fields, never forwarded by a proxy, plus the ones RFC 9112 and common
# practice treat the same way.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# Credentials the proxy owns: whatever the caller sent is replaced (docs/servicetitan.md, "Calling the API").
CREDENTIALS = frozenset({"authorization", "st-app-key"})
REQUEST_ID = "X-Request-ID"
# The proxy's answers name the product without versions (aiohttp's default, "Python/3.11 aiohttp/3.x", tells an
# attacker which CVEs to try). RFC 9110 section 10.2.4 allows a product token alone.
SERVER = "st-proxy"
_SANE_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


def _connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    return _listed(tuple(headers.getall("Connection", ())))


@functools.lru_cache(maxsize=64)  # the same few values ("keep-alive", "close") on nearly every message
def _listed(values: tuple[str, ...]) -> frozenset[str]:
    listed: set[str] = set()
    for value in values:
        listed.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(listed)


# A made-up request id: 32 hex digits, as uuid4().hex gave, but a random per-process prefix and a counter: unique
# among this process's requests and, by the prefix, across replicas, without a UUID object (and a read of the random
# source) per request. It names a request in logs; it authorises nothing, so it need not be unpredictable.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4)))


def request_id(headers: CIMultiDictProxy[str]) -> str:
    """Keep the caller's id when it is a plain token, so traces join up; otherwise make one."""
    given = headers.get(REQUEST_ID)
    if given and _SANE_REQUEST_ID.match(given):
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


@functools.lru_cache(maxsize=16)
def _request_drop(tenant_header: str | None) -> frozenset[str]:
    """The request headers never forwarded, built once per routing.tenant_header rather than per request."""
    drop = HOP_BY_HOP | CREDENTIALS | {"host", REQUEST_ID.lower()}
    return drop | {tenant_header.lower()} if tenant_header else drop


_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    tenant_header: str | None,
    authorization: str,
    app_key: str,
    request_id: str,
) -> CIMultiDict[str]:
    drop = _request_drop(tenant_header)
    if "Connection" in incoming:
        drop = drop | _connection_listed(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or lower.startswith("proxy-"):
            continue
        out.add(name, value)
    out["Authorization"] = authorization
    out["ST-App-Key"] = app_key
    out[REQUEST_ID] = request_id
    return out


def downstream_response_headers(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    drop = _RESPONSE_DROP | _connection_listed(upstream) if "Connection" in upstream else _RESPONSE_DROP
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in drop:
            out.add(name, value)
    out.setdefault(REQUEST_ID, request_id)
    return out


# Headers aiohttp's client would invent. The caller's own are forwarded; none is added (docs/forwarding.md: an
# added Accept-Encoding would hand callers compressed bodies they never asked for).
NO_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """``Server: st-proxy`` on the proxy's own answers instead of aiohttp's ``Python/3.x aiohttp/3.y`` (no versions
    for a scanner to match). The proxy's own answers are whole ``web.Response`` objects (problems, the token endpoint,
    the admin port); relayed upstream answers are streamed ``StreamResponse`` objects and keep their own ``Server``.
    An ``on_response_prepare`` hook: aiohttp has set its default by then, so it is replaced here."""
    if isinstance(response, web.Response):
        response.headers["Server"] = SERVER
