"""Which tenant a request is for (docs/configuration.md, "Routing a request to a tenant"). Pure functions.

1. the tenant header, if configured and present (headers.py removes it before forwarding);
2. else the ``/{module}/v{n}/tenant/{id}/`` segment of the path;
3. else ``routing.default_tenant``.
Header and path naming two tenants: 400 ``tenant_mismatch``; no tenant at all: 400 ``tenant_required``; a tenant header
that is not a tenant id (or appears twice with different ids): 400 ``invalid_request``. Whether the tenant is configured
(403 ``unknown_tenant``) is the caller's question.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..config import RoutingConfig
from ..config.values import TENANT_ID
from ..errors import RequestError, TenantMismatch, TenantRequired

# ServiceTitan URLs are {base}/{module}/v{n}/tenant/{tenant id}/... (docs/servicetitan.md, "Calling the API"). re.ASCII:
# \d would also match other scripts' digits ("٤٢"), which are no tenant id; \Z, not $, which also matches before a
# trailing newline.
TENANT_IN_PATH = re.compile(r"/[^/]+/v\d+/tenant/(\d+)(?:/|\Z)", re.ASCII)


def tenant_from_path(path: str) -> str | None:
    """The tenant id in a decoded request path, or None."""
    match = TENANT_IN_PATH.match(path)
    return match.group(1) if match else None


def tenant_from_header(headers: Mapping[str, str], name: str | None) -> str | None:
    """The tenant id the header names, None when it is absent (or header routing is off); RequestError when it is
    present but not a tenant id."""
    if not name:
        return None
    getall = getattr(headers, "getall", None)
    values = getall(name, []) if getall else ([headers[name]] if name in headers else [])
    ids = {value.strip() for value in values}
    if not ids:
        return None
    if len(ids) > 1:
        raise RequestError(f"the {name} header appears more than once with different values")
    (tenant,) = ids
    if not TENANT_ID.fullmatch(tenant):  # the same rule as for ids in the config
        raise RequestError(f"the {name} header must be a tenant id (digits)")
    return tenant


def resolve_tenant(path: str, headers: Mapping[str, str], routing: RoutingConfig) -> str:
    """Header, then path, then default. ``path`` is the decoded path, so ``%31`` counts as ``1``, as upstream will."""
    from_header = tenant_from_header(headers, routing.tenant_header)
    from_path = tenant_from_path(path)
    if from_header is not None and from_path is not None and from_header != from_path:
        raise TenantMismatch(
            f"the {routing.tenant_header} header names tenant {from_header}, the path names {from_path}"
        )
    tenant = from_header or from_path or routing.default_tenant
    if tenant is None:
        where = f"a {routing.tenant_header} header or " if routing.tenant_header else ""
        raise TenantRequired(f"name the tenant with {where}a /{{module}}/v{{n}}/tenant/{{id}}/ path")
    return tenant
