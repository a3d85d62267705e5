"""The admin port: /healthz, /readyz, /metrics, /tenants. Never on the data port; never a secret or a token."""

from __future__ import annotations

from datetime import datetime, timezone

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from .runtime import RUNTIME, Runtime
from .tokens import TokenStatus


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    rt: Runtime = request.app[RUNTIME]
    if rt.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not rt.ready():
        return web.json_response({"status": "starting", "waiting_for": rt.pending_tenants()}, status=503)
    return web.json_response({"status": "ready"})


async def tenants(request: web.Request) -> web.Response:
    """Per tenant: environment, token state and times, last error code, replays. Never a secret or a token."""
    rt: Runtime = request.app[RUNTIME]
    manager = rt.tokens
    result = []
    for tenant in rt.holder.current.tenants.values():
        status = manager.status(tenant) if manager else TokenStatus("none", None, None, None)
        result.append({
            "id": tenant.tenant_id,
            "environment": tenant.environment.name,
            "token": {
                "state": status.state,
                "expires_at": _rfc3339(status.expires_at),
                "last_fetch": _rfc3339(status.last_fetch),
                "last_error": status.last_error,
            },
            "replays": manager.replays(tenant.tenant_id) if manager else 0,
        })
    return web.json_response({"tenants": result})


def create_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/tenants", tenants)
    app.router.add_get("/metrics", make_aiohttp_handler(runtime.metrics.exposition))
    return app
