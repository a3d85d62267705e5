"""Errors the proxy itself answers with, and the one place that maps them to responses.

    ProxyError                     every error a caller can get from the proxy (never from upstream)
    ├── RequestError               the request itself is wrong: 400 invalid_request, tenant_required, tenant_mismatch,
    │                              403 unknown_tenant, 413 body_too_large
    ├── TokenError                 the tenant's token cannot be had: 502 token_rejected, 503 token_unavailable
    └── UpstreamError              ServiceTitan cannot be reached: 502 upstream_unreachable, 504 upstream_timeout

Each answer is ``application/problem+json`` (RFC 9457, the shape ServiceTitan's own errors have) with ``tenant`` and
``request_id`` members and an ``X-ST-Proxy-Error: <code>`` header, so a caller can tell a proxy error from an upstream
one. Messages are written by the proxy; none carries a secret or a token.
"""

from __future__ import annotations

import json
import math

from aiohttp import web

PROBLEM_TYPE = "https://github.com/st-credential-proxy/st-credential-proxy/blob/main/README.md#errors"
ERROR_HEADER = "X-ST-Proxy-Error"


class ProxyError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal proxy error"

    def __init__(self, detail: str, *, tenant: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.tenant = tenant
        self.retry_after = retry_after


class RequestError(ProxyError):
    status = 400
    code = "invalid_request"
    title = "Request not accepted by the proxy"


class TenantRequired(RequestError):
    code = "tenant_required"
    title = "No tenant named"


class TenantMismatch(RequestError):
    code = "tenant_mismatch"
    title = "Header and path name different tenants"


class UnknownTenant(RequestError):
    status = 403
    code = "unknown_tenant"
    title = "Tenant not configured"


class BodyTooLarge(RequestError):
    status = 413
    code = "body_too_large"
    title = "Request body too large"


class TokenError(ProxyError):
    pass


class TokenRejected(TokenError):
    status = 502
    code = "token_rejected"
    title = "Token endpoint refused the tenant's credentials"


class TokenUnavailable(TokenError):
    status = 503
    code = "token_unavailable"
    title = "No token available for the tenant"


class UpstreamError(ProxyError):
    pass


class UpstreamUnreachable(UpstreamError):
    status = 502
    code = "upstream_unreachable"
    title = "ServiceTitan API unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    title = "ServiceTitan API too slow"


def problem_response(error: ProxyError, request_id: str | None) -> web.Response:
    body = {
        "type": f"{PROBLEM_TYPE}-{error.code}",
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "tenant": error.tenant,
        "request_id": request_id,
    }
    headers = {ERROR_HEADER: error.code}
    if request_id:
        headers["X-Request-ID"] = request_id
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return web.Response(
        status=error.status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )
