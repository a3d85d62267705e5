"""Which tenant a request is for (design.md section 1, "Routing a request to a tenant"). Pure functions."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .config import RoutingConfig
from .errors import RequestError, TenantMismatch, TenantRequired

# ServiceTitan URLs are {base}/{module}/v{n}/tenant/{tenant id}/... (servicetitan.md, "Calling the API").
TENANT_IN_PATH = re.compile(r"^/[^/]+/v\d+/tenant/(\d+)(/|$)")
DIGITS = re.compile(r"^[0-9]{1,20}$")


def tenant_from_path(path: str) -> str | None:
    match = TENANT_IN_PATH.match(path)
    return match.group(1) if match else None


def resolve_tenant(path: str, headers: Mapping[str, str], routing: RoutingConfig) -> str:
    """Header, then path, then default. ``path`` is the decoded path, so ``%31`` counts as ``1`` as upstream will."""
    from_header = None
    if routing.tenant_header:
        raw = headers.get(routing.tenant_header)
        if raw is not None:
            raw = raw.strip()
            if not DIGITS.match(raw):
                raise RequestError(f"the {routing.tenant_header} header must be a tenant id (digits)")
            from_header = raw
    from_path = tenant_from_path(path)
    if from_header and from_path and from_header != from_path:
        raise TenantMismatch(f"the {routing.tenant_header} header names tenant {from_header}, the path names {from_path}")
    tenant = from_header or from_path or routing.default_tenant
    if tenant is None:
        where = f"a {routing.tenant_header} header or " if routing.tenant_header else ""
        raise TenantRequired(f"name the tenant with {where}a /{{module}}/v{{n}}/tenant/{{id}}/ path")
    return tenant
