"""``POST /connect/token`` on the data port: the local token endpoint (RFC 6749 section 4.4, client credentials).

Answered by the proxy itself and never forwarded, whatever ``routing.default_tenant`` says. The client authenticates
with ``client_secret_post`` (``client_id`` and ``client_secret`` in the form) or ``client_secret_basic`` (raw or
form-encoded Basic, credentials.py); using both at once is refused (RFC 6749 section 2.3). Answers follow RFC 6749
sections 5.1 and 5.2, with ``Cache-Control: no-store``. Without clients (a loopback data port) any client-credentials
request gets a placeholder token, so a library that insists on fetching a token works unchanged.
"""

from __future__ import annotations

import json
import math
import secrets as random_source
from urllib.parse import parse_qsl

from aiohttp import web

from ..config import Config
from ..errors import ClientThrottled, ClientUnauthorized
from ..http.exchange import Exchange
from . import local_tokens
from .credentials import Basic, read_basic, split_scheme
from .gate import Inbound

MAX_FORM_BYTES = 16 * 1024  # a client-credentials form is a few hundred bytes
PLACEHOLDER_PREFIX = "stp0."
# RFC 6749 section 5.1: token answers must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _answer(status: int, body: dict[str, object], ex: Exchange, **headers: str) -> web.Response:
    if "error" in body:
        ex.error = ex.error or f"token_endpoint_{body['error']}"
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers={**NO_STORE, **headers, "X-Request-ID": ex.request_id},
    )


def _error(status: int, error: str, description: str, ex: Exchange, **headers: str) -> web.Response:
    return _answer(status, {"error": error, "error_description": description}, ex, **headers)


async def _form(request: web.Request) -> dict[str, str] | str:
    """The form's parameters, or the reason it is not a usable form."""
    if request.content_type != "application/x-www-form-urlencoded":
        return "the body must be application/x-www-form-urlencoded (RFC 6749 section 4.4.2)"
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        return "the form is too large"
    try:
        body = await request.content.read(MAX_FORM_BYTES + 1)
    except (OSError, web.RequestPayloadError):
        return "the body could not be read"
    if len(body) > MAX_FORM_BYTES:
        return "the form is too large"
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except (UnicodeDecodeError, ValueError):
        return "the form is not UTF-8 text"
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:  # RFC 6749 section 3.2: parameters must not be repeated
            return f"the parameter {key} appears more than once"
        form[key] = value
    return form


async def answer(request: web.Request, config: Config, inbound: Inbound, ex: Exchange) -> web.Response:
    if request.method != "POST":
        return _error(405, "invalid_request", "use POST", ex, Allow="POST")
    form = await _form(request)
    if isinstance(form, str):
        return _error(400, "invalid_request", form, ex)
    grant = form.get("grant_type")
    if not grant:
        return _error(400, "invalid_request", "grant_type is required", ex)
    if grant != "client_credentials":
        return _error(400, "unsupported_grant_type", "only client_credentials is supported", ex)

    registry = inbound.registry(config)
    ttl = int(config.security.local_token_ttl_seconds)
    if not registry:
        inbound.metrics.token_issued(None)
        # Opaque and meaningless: callers are not authenticated here, and the data port strips it like any
        # Authorization header.
        token = PLACEHOLDER_PREFIX + random_source.token_urlsafe(24)
        return _answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": ttl}, ex)

    authorization = request.headers.getall("Authorization", [])
    if len(authorization) > 1:  # ambiguous, as on the data port: which credentials would be meant?
        return _error(400, "invalid_request", "more than one Authorization header", ex)
    scheme, rest = split_scheme(authorization[0] if authorization else "")
    via_basic = scheme.lower() == "basic"
    in_form = "client_id" in form or "client_secret" in form
    if via_basic and in_form:
        return _error(400, "invalid_request", "use one client authentication method, not two", ex)
    if via_basic:
        basic = read_basic(rest)
    elif in_form:
        basic = Basic(((form.get("client_id", ""), form.get("client_secret", "")),))
    else:
        basic = None
    # RFC 6749 section 5.2: a client that tried the Authorization header gets 401 with WWW-Authenticate.
    challenge = {"WWW-Authenticate": 'Basic realm="st-proxy"'} if via_basic else {}
    try:
        if basic is None:
            raise ClientUnauthorized("no client credentials")
        entry, index = inbound.check_basic(registry, basic, ex)
    except ClientThrottled as exc:
        ex.error = exc.code
        wait = str(max(1, math.ceil(exc.retry_after or 1)))
        return _error(429, "invalid_client", exc.detail, ex, **{"Retry-After": wait, "X-ST-Proxy-Error": exc.code})
    except ClientUnauthorized as exc:
        ex.error = exc.code
        return _error(401, "invalid_client", "client authentication failed", ex, **challenge)
    ex.client = entry.client.name
    expires_at = int(inbound.clock()) + ttl
    token = local_tokens.issue(entry.client.name, entry.verifiers[index], expires_at)
    inbound.metrics.token_issued(entry.client.name)
    return _answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": ttl}, ex)
