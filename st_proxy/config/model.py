"""The configuration model: frozen dataclasses built once by ``load.py`` and only read afterwards.

A ``Config`` that exists is complete (secrets resolved, every value checked): the request path reads it and never
validates anything itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .clients import Client
from .limits import LimitsConfig, StateConfig
from .metrics import MetricsConfig
from .secrets import Secret, SecretRef
from .security import SecurityConfig
from .tls import ForwardProxyConfig, TLSConfig
from .values import Address

BUILTIN_ENVIRONMENTS = {
    "integration": {
        "auth_url": "https://auth-integration.servicetitan.io/connect/token",
        "api_url": "https://api-integration.servicetitan.io",
    },
    "production": {
        "auth_url": "https://auth.servicetitan.io/connect/token",
        "api_url": "https://api.servicetitan.io",
    },
}
CLIENT_AUTH_METHODS = ("client_secret_post", "client_secret_basic")
# Headers the proxy itself sets or strips (headers.py): routing on one of them would make no sense.
RESERVED_HEADERS = frozenset(
    {"authorization", "st-app-key", "host", "connection", "content-length", "transfer-encoding", "x-request-id"}
)


class ConfigError(Exception):
    """Every problem found in one load, each as ``path: message``."""

    def __init__(self, problems: list[str], files: tuple[Path, ...] = ()) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.files = files  # the {file: ...} paths the document names, valid or not: what to watch for a retry


@dataclass(frozen=True)
class Environment:
    name: str
    auth_url: str
    api_url: str  # no trailing slash; may carry a path prefix


@dataclass(frozen=True)
class Tenant:
    tenant_id: str
    environment: Environment
    client_id: str
    client_secret: Secret
    app_key: Secret
    client_secret_ref: SecretRef
    app_key_ref: SecretRef
    rate_per_second: float | None = None  # this tenant's own limits.rate_per_second (docs/limits.md)

    def credentials_key(self) -> tuple[str, str, str, str]:
        """What a token is minted from: a change in any part means a token must not be reused (docs/tokens.md)."""
        return (self.environment.auth_url, self.tenant_id, self.client_id, self.client_secret.fingerprint())


@dataclass(frozen=True)
class RoutingConfig:
    tenant_header: str | None = "X-Tenant-ID"
    default_tenant: str | None = None


@dataclass(frozen=True)
class TokenConfig:
    refresh_ahead_seconds: float = 120
    expiry_skew_seconds: float = 30
    client_auth: str = "client_secret_post"
    authorization_prefix: str = "Bearer "
    fetch_timeout_seconds: float = 10
    rejected_cooloff_seconds: float = 60
    replay_body_limit_bytes: int = 1048576
    prewarm_concurrency: int = 8
    scope: str | None = None  # ServiceTitan wants none; a generic OAuth server may
    prewarm_rate_per_second: float = 20  # token requests per second at start-up and reload, all tenants together
    prewarm_ready_seconds: float = 10  # readiness waits for prewarm at most this long


@dataclass(frozen=True)
class UpstreamConfig:
    connect_timeout_seconds: float = 10
    read_timeout_seconds: float = 120
    max_connections: int = 100
    ca_file: str | None = None


@dataclass(frozen=True)
class ShutdownConfig:
    drain_seconds: float = 5
    timeout_seconds: float = 30


@dataclass(frozen=True)
class Config:
    app_key: Secret
    app_key_ref: SecretRef
    tenants: Mapping[str, Tenant]
    environments: Mapping[str, Environment]
    listen: Address = Address("127.0.0.1", 8080)
    admin_listen: Address = Address("127.0.0.1", 9090)
    routing: RoutingConfig = RoutingConfig()
    tokens: TokenConfig = TokenConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    source: Path | None = None
    warnings: tuple[str, ...] = ()
    secret_files: tuple[Path, ...] = field(default=())  # every file a secret was read from, for the watcher
    clients: Mapping[str, Client] = field(default_factory=lambda: MappingProxyType({}))  # docs/security.md
    security: SecurityConfig = SecurityConfig()
    metrics: MetricsConfig = MetricsConfig()
    limits: LimitsConfig | None = None  # None: nothing paced or capped (docs/limits.md)
    state: StateConfig = StateConfig()
    tls: TLSConfig | None = None  # TLS on the data port (tls.py); None: plain HTTP
    forward_proxy: ForwardProxyConfig | None = None  # the HTTPS_PROXY mode (tls.py); None: off
