"""The one place that turns a ``ProxyError`` into an answer: ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

import json
import math

from aiohttp import web

from ..errors import ProxyError

# A tag URI (RFC 4151): an identifier that names the problem without pointing at an address; RFC 9457 section 3.1.1
# allows a non-resolvable type URI. The codes are documented in docs/errors.md.
PROBLEM_TYPE = "tag:st-credential-proxy,2026:problem:"
ERROR_HEADER = "X-ST-Proxy-Error"


def problem_response(error: ProxyError, request_id: str | None) -> web.Response:
    body = {
        "type": f"{PROBLEM_TYPE}{error.code}",
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "tenant": error.tenant,
        "request_id": request_id,
    }
    headers = {**error.headers, ERROR_HEADER: error.code}  # Server: the app's hook (headers.server_header)
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
