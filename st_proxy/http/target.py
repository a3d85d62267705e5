"""The request target: which ones the proxy forwards at all (docs/forwarding.md, "The request target").

The path is forwarded exactly as received, and anything behind the proxy (ServiceTitan, a load balancer, a WAF) may
normalise it: RFC 3986 section 5.2.4 removes ``.`` and ``..`` segments, many servers decode ``%2e`` first and merge
``//``. ``/crm/v2/tenant/A/../../v2/tenant/B/x`` would then be routed here as tenant A while it names B upstream. So a
target whose meaning changes under normalisation is refused, and the tenant is read from the path as sent.
"""

from __future__ import annotations

from urllib.parse import unquote

from aiohttp import web

from ..errors import RequestError


def origin_form(request: web.Request) -> bool:
    """RFC 9112 section 3.2.1: ``/path?query``. Absolute-form, authority-form (CONNECT) and ``*`` are refused."""
    return request.raw_path.startswith("/") and request.method != "CONNECT"


def check_target(request: web.Request) -> str:
    """The decoded path the tenant is read from; RequestError (400 ``invalid_request``) for a target the proxy will
    not forward."""
    # Only origin-form targets: an absolute-form target or CONNECT could aim the proxy at another host.
    if not origin_form(request):
        raise RequestError("only origin-form request targets (/path?query) are accepted; no CONNECT")
    raw = request.raw_path.partition("?")[0].partition("#")[0]
    if "%" not in raw:  # nothing encoded (most requests): the same checks on the path as sent, which is the answer
        if "//" in raw:
            raise RequestError("the request path has an empty segment (//)")
        if "/." in raw and any(segment in (".", "..") for segment in raw.split("/")):
            raise RequestError("the request path has a . or .. segment (also written %2e)")
        return raw
    # Checked as a normalising server would see it: %2e decoded to "." (RFC 3986 section 2.3: an unreserved
    # character) and even %2F to "/", as some servers do before splitting the path.
    decoded = unquote(raw).split("/")[1:]
    # An empty last segment is a trailing slash (and "/" alone is the root): only an empty one in between is "//".
    if any(not segment for segment in decoded[:-1]):
        raise RequestError("the request path has an empty segment (//)")
    if any(segment in (".", "..") for segment in decoded):
        raise RequestError("the request path has a . or .. segment (also written %2e)")
    # Routing reads the segments as sent, each decoded on its own: an encoded "/" (%2F) stays inside its segment, so
    # "tenant%2F5" names no tenant.
    return "/".join(unquote(segment).replace("/", "%2F") for segment in raw.split("/"))
