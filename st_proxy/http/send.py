"""Sending one request to ServiceTitan, and telling its failures apart (connect, timeout, reset)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from yarl import URL

from ..config import Config, Tenant
from ..errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable
from ..ops.metrics import Metrics
from ..upstream.egress import DIRECT
from ..upstream.token_client import Token
from . import headers as hdrs
from .body import Body, body_failure
from .exchange import Exchange

log = logging.getLogger("st_proxy.forwarding")


def upstream_failure(exc: BaseException, tenant: str) -> tuple[str, UpstreamError]:
    """Map a client exception to (metric kind, proxy error)."""
    if isinstance(exc, asyncio.TimeoutError):  # includes aiohttp's ServerTimeoutError and ConnectionTimeoutError
        return "timeout", UpstreamTimeout("the ServiceTitan API did not answer in time", tenant=tenant)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect", UpstreamUnreachable("cannot connect to the ServiceTitan API", tenant=tenant)
    return "reset", UpstreamUnreachable("the ServiceTitan API closed the connection", tenant=tenant)


class Sender:
    """One upstream exchange: the caller's request with the tenant's credentials, as it was received otherwise."""

    def __init__(
        self,
        *,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        egress: Callable[[str], URL | None] = lambda url: DIRECT,
    ) -> None:
        self._session = session
        self._metrics = metrics
        self._egress = egress

    async def send(
        self, request: web.Request, config: Config, tenant: Tenant, token: Token, body: Body, ex: Exchange
    ) -> aiohttp.ClientResponse:
        url = URL(tenant.environment.api_url + request.raw_path, encoded=True)  # encoded: no re-encoding of the path
        out_headers = hdrs.upstream_request_headers(
            request.headers,
            tenant_header=config.routing.tenant_header,
            authorization=config.tokens.authorization_prefix + token.access_token,
            app_key=tenant.app_key.reveal(),
            request_id=ex.request_id,
        )
        sent = time.perf_counter()
        try:
            upstream = await self._session().request(
                request.method,
                url,
                headers=out_headers,
                data=body,
                allow_redirects=False,
                proxy=self._egress(tenant.environment.api_url),
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            caller_side = body_failure(body, tenant.tenant_id)
            if caller_side is not None:
                raise caller_side from None
            log.debug("upstream failure for tenant %s: %s", tenant.tenant_id, type(exc).__name__)
            raise self.failed(exc, tenant)[1] from None
        ex.upstream_ms = round((time.perf_counter() - sent) * 1000, 2)
        return upstream

    def failed(self, exc: BaseException, tenant: Tenant) -> tuple[str, UpstreamError]:
        """Count a failed exchange with ServiceTitan; (metric kind, the error to answer with)."""
        kind, error = upstream_failure(exc, tenant.tenant_id)
        self._metrics.upstream_error(tenant.tenant_id, kind)
        return kind, error
