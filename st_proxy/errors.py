"""Errors the proxy itself answers with. ``http/problems.py`` is the one place that maps them to responses.

    ProxyError                     every error a caller can get from the proxy (never from upstream); itself 500
                                   internal_error, the answer to a bug (an unexpected exception, http/handler.py)
    ├── RequestError               the request itself is wrong: 400 invalid_request, tenant_required, tenant_mismatch,
    │                              403 unknown_tenant, 413 body_too_large
    ├── CallerError                who is calling, and may it: 401 client_unauthorized, 429 client_throttled,
    │                              403 tenant_forbidden, 403 header_required (docs/security.md)
    ├── TokenError                 the tenant's token cannot be had: 502 token_rejected, 503 token_unavailable
    ├── UpstreamError              ServiceTitan cannot be reached: 502 upstream_unreachable, 504 upstream_timeout
    └── LimitError                 the tenant's budget has no room in time (docs/limits.md): 429 rate_limited,
                                   503 tenant_busy, both with Retry-After

Each answer is ``application/problem+json`` (RFC 9457, the shape ServiceTitan's own errors have) with ``tenant`` and
``request_id`` members and an ``X-ST-Proxy-Error: <code>`` header, so a caller can tell a proxy error from an upstream
one. Messages are written by the proxy; none carries a secret or a token.
"""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal proxy error"
    headers: dict[str, str] = {}  # noqa: RUF012 - read only: extra response headers of this kind of error

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


class CallerError(ProxyError):
    pass


class ClientUnauthorized(CallerError):
    status = 401
    code = "client_unauthorized"
    title = "Client credentials missing or wrong"
    # RFC 9110 section 11.6.1: a 401 names the scheme it wants; Basic is accepted too (docs/security.md).
    headers = {"WWW-Authenticate": 'Bearer realm="st-proxy"'}  # noqa: RUF012


class ClientThrottled(CallerError):
    status = 429
    code = "client_throttled"
    title = "Too many wrong secrets for this client"


class TenantForbidden(CallerError):
    status = 403
    code = "tenant_forbidden"
    title = "Tenant not allowed for this client"


class HeaderRequired(CallerError):
    status = 403
    code = "header_required"
    title = "Required request header missing"


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


class LimitError(ProxyError):
    pass


class RateLimited(LimitError):
    status = 429
    code = "rate_limited"
    title = "Tenant over its rate limit"


class TenantBusy(LimitError):
    status = 503
    code = "tenant_busy"
    title = "Too many requests in flight for the tenant"
