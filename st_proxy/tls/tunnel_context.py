"""Which ``CONNECT`` host a data-port request came through (the forward-proxy mode, ``forward.py``).

Its own module, without the certificate code of ``leaves.py``: the data handler asks it on every request, and a
process that never intercepts a tunnel should not load the cryptography package (several MiB of RSS) to answer no.
"""

from __future__ import annotations

import ssl

from aiohttp import web


class TunnelContext(ssl.SSLContext):
    connect_host: str = ""


def tunnel_host(request: web.BaseRequest) -> str | None:
    """The ``CONNECT`` host a request came through the forward proxy for, or None for a direct data-port request."""
    transport = request.transport
    context = transport.get_extra_info("sslcontext") if transport is not None else None
    return context.connect_host if isinstance(context, TunnelContext) else None
