"""The admin port: /healthz, /readyz, /metrics, /tenants. Never on the data port; never a secret or a token.

``security.expose_tenants`` and ``security.admin_token`` (docs/security.md): /tenants lists tenant ids and token
states, which only the host should see unless asked for (404 on a non-loopback ``admin_listen`` by default), and with
an admin token /metrics and /tenants need ``Authorization: Bearer <it>``, as Prometheus' ``authorization`` setting and
a PodMonitor's ``bearerTokenSecret`` send it. /healthz and /readyz always answer: probes carry no credentials.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from datetime import UTC, datetime
from typing import Protocol

from aiohttp import web

from ..config import Config
from ..http.headers import server_header
from ..upstream.tokens import TokenManager, TokenStatus
from .exposition import MetricsPage
from .metrics import Metrics


class AdminSource(Protocol):
    """What the admin port reads of the running proxy (``server.runtime.Runtime`` is one)."""

    metrics: Metrics
    tokens: TokenManager | None
    draining: bool

    @property
    def config(self) -> Config: ...

    def ready(self) -> bool: ...

    def pending_tenants(self) -> list[str]: ...


SOURCE = web.AppKey("admin_source", AdminSource)


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[SOURCE]
    if rt.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not rt.ready():
        return web.json_response({"status": "starting", "waiting_for": rt.pending_tenants()}, status=503)
    return web.json_response({"status": "ready"})


async def tenants(request: web.Request) -> web.Response:
    """Per tenant: environment, token state and times, last error code, replays. Never a secret or a token."""
    rt = request.app[SOURCE]
    manager = rt.tokens
    result = []
    for tenant in rt.config.tenants.values():
        status = manager.status(tenant) if manager else TokenStatus("none", None, None, None)
        result.append(
            {
                "id": tenant.tenant_id,
                "environment": tenant.environment.name,
                "token": {
                    "state": status.state,
                    "expires_at": _rfc3339(status.expires_at),
                    "last_fetch": _rfc3339(status.last_fetch),
                    "last_error": status.last_error,
                },
                "replays": manager.replays(tenant.tenant_id) if manager else 0,
            }
        )
    # The snapshot above is taken on the loop (consistent, ~3 us a tenant); encoding it, as long again, is not.
    body = await asyncio.to_thread(json.dumps, {"tenants": result})
    return web.Response(text=body, content_type="application/json")


GUARDED = ("/metrics", "/tenants")


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    if request.path not in GUARDED:
        return await handler(request)
    config = request.app[SOURCE].config  # read per request: a reload changes security
    token = config.security.admin_token
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.reveal().encode()):
            return web.json_response(
                {"error": "admin_unauthorized", "detail": f"{request.path} needs the admin token (Bearer)"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="st-proxy-admin"'},
            )
    if request.path == "/tenants" and not config.security.tenants_exposed(config.admin_listen):
        raise web.HTTPNotFound()
    return await handler(request)


def create_admin_app(runtime: AdminSource) -> web.Application:
    app = web.Application(middlewares=[guard])
    app.on_response_prepare.append(server_header)
    app[SOURCE] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/tenants", tenants)
    app.router.add_get("/metrics", MetricsPage(runtime.metrics).handle)
    return app
