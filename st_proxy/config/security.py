"""The ``security:`` section, and the closed-by-default rule (docs/security.md).

    security:
      allow_unauthenticated: false   # true: a non-loopback data port may run without clients (a warning at start)
      require_header: null           # a header name every data-port request must carry (against SSRF)
      local_token_ttl_seconds: 900
      token_signing_key: null        # a secret reference; else each client's key is derived from its secret
      max_body_bytes: null           # a larger request body: 413 body_too_large
      expose_tenants: auto           # admin /tenants: auto = only on a loopback admin_listen; true | false
      admin_token: null              # a secret reference: /metrics and /tenants then need it as a Bearer token

Anything that reaches the data port acts with the credentials of every tenant it may name, so a data port that more
than this host can reach must authenticate its callers: with clients (or, once TLS is built, client certificates).
``exposure`` states that rule; the loader, ``check-config`` and a reload all apply it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .problems import Problems, ResolveSecret
from .secrets import Secret, SecretRef
from .values import HEADER_NAME, Address, describe, is_loopback

EXPOSE_CHOICES = ("auto", True, False)
_KEYS = (
    "allow_unauthenticated",
    "require_header",
    "local_token_ttl_seconds",
    "token_signing_key",
    "max_body_bytes",
    "expose_tenants",
    "admin_token",
)
# Headers the proxy strips or sets itself (headers.py): requiring one would be meaningless or impossible.
_UNFIT_HEADERS = frozenset({"authorization", "host", "connection", "content-length", "transfer-encoding"})
MIN_SIGNING_KEY_CHARS = 32


@dataclass(frozen=True)
class SecurityConfig:
    allow_unauthenticated: bool = False
    require_header: str | None = None
    local_token_ttl_seconds: float = 900
    token_signing_key: Secret | None = None
    token_signing_key_ref: SecretRef | None = None
    max_body_bytes: int | None = None
    expose_tenants: str | bool = "auto"
    admin_token: Secret | None = None
    admin_token_ref: SecretRef | None = None

    def tenants_exposed(self, admin_listen: Address) -> bool:
        if self.expose_tenants == "auto":
            return is_loopback(admin_listen)
        return bool(self.expose_tenants)


def parse_security(raw: object, *, secret: ResolveSecret, problems: Problems) -> SecurityConfig:
    if not problems.mapping(raw, "security"):
        return SecurityConfig()
    assert isinstance(raw, Mapping)
    problems.unknown_keys("security", raw, _KEYS)
    add = problems.add
    values: dict[str, Any] = {}
    allow = raw.get("allow_unauthenticated", False)
    if not isinstance(allow, bool):
        add("security.allow_unauthenticated", f"expected true or false, got {describe(allow)}")
    else:
        values["allow_unauthenticated"] = allow
    header = raw.get("require_header")
    if header is not None:
        if not isinstance(header, str) or not HEADER_NAME.fullmatch(header):
            add("security.require_header", "expected a header name (letters, digits, '-') or null")
        elif header.lower() in _UNFIT_HEADERS or header.lower().startswith("proxy-"):
            add("security.require_header", f"{header} is a header the proxy strips or sets itself")
        else:
            values["require_header"] = header
    ttl = raw.get("local_token_ttl_seconds", SecurityConfig.local_token_ttl_seconds)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or not 1 <= ttl <= 86400:
        add("security.local_token_ttl_seconds", "expected a number of seconds from 1 to 86400")
    else:
        values["local_token_ttl_seconds"] = ttl
    limit = raw.get("max_body_bytes")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            add("security.max_body_bytes", "expected a whole number of bytes >= 0, or null")
        else:
            values["max_body_bytes"] = limit
    expose = raw.get("expose_tenants", "auto")
    if expose not in EXPOSE_CHOICES or (expose in (0, 1) and not isinstance(expose, bool)):
        add("security.expose_tenants", "expected auto, true or false")
    else:
        values["expose_tenants"] = expose
    for key in ("token_signing_key", "admin_token"):
        if raw.get(key) is None:
            continue
        got = secret(f"security.{key}", raw[key])
        if got is None:
            continue
        if key == "token_signing_key" and len(got[0].reveal()) < MIN_SIGNING_KEY_CHARS:
            add(f"security.{key}", f"needs at least {MIN_SIGNING_KEY_CHARS} characters")
            continue
        values[key], values[f"{key}_ref"] = got
    return SecurityConfig(**values)


def exposure(
    listen: Address,
    *,
    clients: int,
    client_certificates: bool,
    security: SecurityConfig,
    tls: bool = False,
) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the closed-by-default rule for a data port at ``listen``.

    ``client_certificates``: every caller must present a certificate (mTLS, ``tls.client_ca_file``). ``tls``: the
    data port speaks TLS, so client secrets and local tokens do not cross the network in clear text.
    """
    if is_loopback(listen):
        return [], []
    if not clients and not client_certificates:
        if security.allow_unauthenticated:
            return [], [
                f"listen: {listen} is reachable from beyond this host and callers are not authenticated "
                "(security.allow_unauthenticated: true): anything that can connect acts with every tenant's credentials"
            ]
        return [
            f"listen: {listen} is reachable from beyond this host, but no clients are configured: anything that "
            "could connect would act with every tenant's credentials. Add clients (docs/security.md), listen on "
            "127.0.0.1, or set security.allow_unauthenticated: true"
        ], []
    if clients and not tls:
        return [], [
            f"listen: {listen} is reachable from beyond this host without TLS: client secrets and local tokens "
            "cross the network in clear text"
        ]
    return [], []
