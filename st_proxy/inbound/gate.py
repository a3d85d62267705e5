"""The data port's caller steps (docs/security.md): require_header, authenticate, authorize.

    require_header -> (check target) -> authenticate -> (route) -> authorize -> (look up the tenant, limit, body,
    token, send, relay)

Authentication comes before routing and before any token work; authorization before the tenant's existence is looked
up, so a restricted client learns nothing about tenants outside its list. ``Inbound`` keeps the one piece of state
that outlives a config (the wrong-secret throttle); the registry of clients is rebuilt when the config changes, so
clients reload like tenants.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from aiohttp import web

from ..config import Config
from ..config.clients import Client
from ..errors import ClientThrottled, ClientUnauthorized, HeaderRequired, TenantForbidden, UnknownTenant
from ..http.exchange import Exchange
from ..ops.client_metrics import ClientMetrics
from . import local_tokens
from .credentials import Basic, Bearer, read_authorization
from .registry import ClientRegistry, Entry
from .throttle import WrongSecretThrottle

TOKEN_PATH = "/connect/token"
_CODES_TO_RESULT = {
    "client_unauthorized": "unauthorized",
    "client_throttled": "throttled",
    "tenant_forbidden": "forbidden",
}


class Inbound:
    def __init__(self, *, metrics: ClientMetrics, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.clock = clock
        self.throttle = WrongSecretThrottle(clock=clock)
        self._config: Config | None = None
        self._registry: ClientRegistry | None = None

    def registry(self, config: Config) -> ClientRegistry:
        """The clients of ``config``, built once per config object (a reload makes a new one)."""
        if config is not self._config or self._registry is None:
            self._registry = ClientRegistry(config)
            self._config = config
            self.throttle.retain(config.clients)
        return self._registry

    # -- the steps --------------------------------------------------------------------------------------------
    @staticmethod
    def check_header(path: str, headers: Mapping[str, str], config: Config) -> None:
        """``security.require_header``: an SSRF payload rarely controls request headers. The token endpoint is
        exempt: it needs client credentials anyway."""
        name = config.security.require_header
        if name and name not in headers and path != TOKEN_PATH:
            raise HeaderRequired(f"requests to this proxy must carry the {name} header")

    def authenticate(self, authorization: list[str], config: Config, ex: Exchange) -> Client | None:
        """The calling client; None when no clients are configured (then callers are not authenticated).
        ``authorization``: every Authorization header sent; more than one is refused, as ambiguous."""
        registry = self.registry(config)
        if not registry:
            return None
        presented = read_authorization(authorization[0]) if len(authorization) == 1 else None
        if isinstance(presented, Bearer):
            entry = self.check_token(registry, presented.token, ex)
        elif isinstance(presented, Basic):
            entry, _ = self.check_basic(registry, presented, ex)
        else:
            raise ClientUnauthorized(
                "this proxy needs client credentials: Authorization: Basic base64(name:secret), or a Bearer token "
                f"from POST {TOKEN_PATH}"
            )
        ex.client = entry.client.name
        return entry.client

    def check_token(self, registry: ClientRegistry, token: str, ex: Exchange) -> Entry:
        claims = local_tokens.parse(token)
        entry = registry.get(claims.client_name) if claims else None
        if claims is None or entry is None:
            raise ClientUnauthorized(f"the bearer token is not one this proxy issued; get one from POST {TOKEN_PATH}")
        ex.claimed = entry.client.name
        if not local_tokens.verify(claims, entry.verifiers, self.clock()):
            raise ClientUnauthorized(
                f"the bearer token has expired or its secret was rotated; get a new one from POST {TOKEN_PATH}"
            )
        return entry

    def check_basic(self, registry: ClientRegistry, basic: Basic, ex: Exchange) -> tuple[Entry, int]:
        """The client and which of its secrets matched; ClientThrottled / ClientUnauthorized otherwise."""
        claimed = None
        for name, secret in basic.candidates:
            entry = registry.get(name)
            if entry is None:
                continue
            claimed = claimed or entry
            index = registry.secret_index(entry, secret)
            if index is not None:
                ex.claimed = name
                return entry, index
        if claimed is None:
            raise ClientUnauthorized("unknown client name or wrong secret")
        name = claimed.client.name
        ex.claimed = name
        wait = self.throttle.retry_after(name)
        if wait is not None:
            raise ClientThrottled(
                f"too many wrong secrets for client {name}; the right secret still works", retry_after=wait
            )
        self.throttle.wrong_secret(name)
        raise ClientUnauthorized("unknown client name or wrong secret")

    @staticmethod
    def authorize(client: Client | None, tenant_id: str, config: Config) -> None:
        """Before the tenant's existence is looked up: outside the client's list is 403 tenant_forbidden, configured
        or not; a ``*`` client naming an unconfigured tenant gets the usual 403 unknown_tenant."""
        if client is None:
            return
        if not client.allows(tenant_id):
            raise TenantForbidden(f"client {client.name} may not use tenant {tenant_id}", tenant=tenant_id)
        if client.tenants is None and tenant_id not in config.tenants:
            raise UnknownTenant(f"tenant {tenant_id} has no credentials configured here", tenant=tenant_id)

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def observe(self, ex: Exchange, config: Config) -> None:
        """``st_proxy_client_auth_total`` for one finished request, when clients are configured."""
        if not config.clients:
            return
        result = _CODES_TO_RESULT.get(ex.error or "")
        if result is not None:
            self.metrics.auth_result(ex.claimed, result)
        elif ex.client is not None:
            self.metrics.auth_result(ex.client, "ok")


INBOUND = web.AppKey("inbound", Inbound)
