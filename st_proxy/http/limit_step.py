"""The limit step (docs/limits.md): between looking up the tenant and the token. What the request holds is given back
when it ends (``Exchange.release``, called by the handler once the answer has been relayed)."""

from __future__ import annotations

from aiohttp import web

from ..config import Config, Tenant
from ..limits.limiter import Admission, Limiter, Unlimited
from .exchange import Exchange


async def limit(
    limiter: Limiter, request: web.Request, config: Config, tenant: Tenant, ex: Exchange
) -> Admission | Unlimited:
    admission = await limiter.admit(request, config, tenant)
    ex.release = admission.release
    return admission
