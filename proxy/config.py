"""The configuration: frozen dataclasses, and the one loader that builds them.

Loading validates everything and reports every problem at once, each prefixed by its path
(``tenants.42.client_secret: env var ST_X is not set``), in a single ``ConfigError``. Secrets are resolved at load, so a
``Config`` that exists is complete: the request path only reads it. Nothing else in the package reads the environment;
``from_environment`` takes the environment as an argument.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from .secret_source import Secret, SecretError, SecretRef, parse_ref, resolve

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
TENANT_ID = re.compile(r"^[0-9]{1,20}$")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 section 5.6.2 token


class ConfigError(Exception):
    """Every problem found in one load, each as ``path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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

    def credentials_key(self) -> tuple[str, str, str, str]:
        """What a token is minted from: a change in any part means a token must not be reused (design.md section 2)."""
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


# Each section's fields: name -> (kind, check). kinds: "seconds" (number >= 0), "positive_int", "int0", "str", "ostr".
_SECTIONS: dict[str, tuple[type, dict[str, str]]] = {
    "tokens": (
        TokenConfig,
        {
            "refresh_ahead_seconds": "seconds",
            "expiry_skew_seconds": "seconds",
            "client_auth": "client_auth",
            "authorization_prefix": "str",
            "fetch_timeout_seconds": "positive_seconds",
            "rejected_cooloff_seconds": "seconds",
            "replay_body_limit_bytes": "int0",
            "prewarm_concurrency": "positive_int",
            "scope": "ostr",
        },
    ),
    "upstream": (
        UpstreamConfig,
        {
            "connect_timeout_seconds": "positive_seconds",
            "read_timeout_seconds": "positive_seconds",
            "max_connections": "positive_int",
            "ca_file": "ostr",
        },
    ),
    "shutdown": (ShutdownConfig, {"drain_seconds": "seconds", "timeout_seconds": "seconds"}),
}
_TOP_KEYS = {"listen", "admin_listen", "app_key", "environments", "routing", "tenants", *_SECTIONS}


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.warnings: list[str] = []
        self.secret_files: list[Path] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def unknown_keys(self, path: str, raw: Mapping[str, Any], allowed: set[str] | dict[str, Any]) -> None:
        for key in raw:
            if key not in allowed:
                self.add(f"{path}.{key}" if path else str(key), "unknown key")


def parse_address(text: object) -> Address:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    if not isinstance(text, str):
        raise ValueError("expected HOST:PORT")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return Address(host or "0.0.0.0", int(port))


def _check_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a URL string")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return value.rstrip("/")


def _tenant_id(raw: object) -> str | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int) and raw >= 0:
        return str(raw)
    if isinstance(raw, str) and TENANT_ID.match(raw):
        return raw
    return None


def _value(kind: str, raw: object) -> object:
    if kind in ("seconds", "positive_seconds"):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw < 0:
            raise ValueError("expected a number of seconds >= 0")
        if kind == "positive_seconds" and raw == 0:
            raise ValueError("must be greater than 0")
        return raw
    if kind in ("positive_int", "int0"):
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < (1 if kind == "positive_int" else 0):
            raise ValueError(f"expected a whole number >= {1 if kind == 'positive_int' else 0}")
        return raw
    if kind == "client_auth":
        if raw not in CLIENT_AUTH_METHODS:
            raise ValueError(f"expected one of {', '.join(CLIENT_AUTH_METHODS)}")
        return raw
    if kind == "str":
        if not isinstance(raw, str):
            raise ValueError("expected a string")
        return raw
    if raw is not None and not isinstance(raw, str):  # "ostr"
        raise ValueError("expected a string or null")
    return raw


def _section(problems: _Problems, name: str, raw: object) -> Any:
    cls, fields = _SECTIONS[name]
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        problems.add(name, "expected a mapping")
        return cls()
    problems.unknown_keys(name, raw, fields)
    values = {}
    for key, kind in fields.items():
        if key in raw:
            try:
                values[key] = _value(kind, raw[key])
            except ValueError as exc:
                problems.add(f"{name}.{key}", str(exc))
    return cls(**values)


def _secret(problems: _Problems, path: str, raw: object, environ: Mapping[str, str]) -> tuple[Secret, SecretRef] | None:
    try:
        ref = parse_ref(raw)
        secret = resolve(ref, environ)
    except SecretError as exc:
        problems.add(path, str(exc))
        return None
    if ref.kind == "file":
        problems.secret_files.append(Path(ref.where))
    if ref.literal:
        problems.warnings.append(f"{path}: a literal secret in the config file; prefer {{env: ...}} or {{file: ...}}")
    return secret, ref


def _environments(problems: _Problems, raw: object) -> dict[str, Environment]:
    merged: dict[str, Any] = {name: dict(urls) for name, urls in BUILTIN_ENVIRONMENTS.items()}
    if raw is not None and not isinstance(raw, Mapping):
        problems.add("environments", "expected a mapping")
        raw = None
    for name, urls in (raw or {}).items():
        if not isinstance(urls, Mapping):
            problems.add(f"environments.{name}", "expected a mapping with auth_url and api_url")
            continue
        problems.unknown_keys(f"environments.{name}", urls, {"auth_url", "api_url"})
        merged[str(name)] = {**merged.get(str(name), {}), **{k: v for k, v in urls.items() if k in ("auth_url", "api_url")}}
    result = {}
    for name, urls in merged.items():
        checked = {}
        for key in ("auth_url", "api_url"):
            if key not in urls:
                problems.add(f"environments.{name}.{key}", "is required")
                continue
            try:
                checked[key] = _check_url(urls[key])
            except ValueError as exc:
                problems.add(f"environments.{name}.{key}", str(exc))
        if len(checked) == 2:
            result[name] = Environment(name, checked["auth_url"], checked["api_url"])
    return result


def _tenants(
    problems: _Problems,
    raw: object,
    environments: Mapping[str, Environment],
    app_key: tuple[Secret, SecretRef] | None,
    environ: Mapping[str, str],
) -> dict[str, Tenant]:
    if raw is None:
        problems.add("tenants", "is required (at least one tenant)")
        return {}
    if not isinstance(raw, Mapping) or not raw:
        problems.add("tenants", "expected a mapping of tenant id to its credentials")
        return {}
    result = {}
    for key, spec in raw.items():
        tenant_id = _tenant_id(key)
        path = f"tenants.{key}"
        if tenant_id is None:
            problems.add(path, "tenant id must be digits")
            continue
        if tenant_id in result:
            problems.add(path, "tenant listed twice")
            continue
        if not isinstance(spec, Mapping):
            problems.add(path, "expected a mapping with client_id and client_secret")
            continue
        problems.unknown_keys(path, spec, {"environment", "client_id", "client_secret", "app_key"})
        env_name = spec.get("environment", "production")
        environment = environments.get(str(env_name))
        if environment is None:
            known = ", ".join(sorted(environments))
            problems.add(f"{path}.environment", f"unknown environment {env_name!r} (known: {known})")
        client_id = spec.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            problems.add(f"{path}.client_id", "is required (a non-empty string)")
        if "client_secret" not in spec:
            problems.add(f"{path}.client_secret", "is required")
            secret = None
        else:
            secret = _secret(problems, f"{path}.client_secret", spec["client_secret"], environ)
        own_key = _secret(problems, f"{path}.app_key", spec["app_key"], environ) if "app_key" in spec else app_key
        if environment and isinstance(client_id, str) and client_id and secret and own_key:
            result[tenant_id] = Tenant(tenant_id, environment, client_id, secret[0], own_key[0], secret[1], own_key[1])
    return result


def from_mapping(raw: object, environ: Mapping[str, str], source: Path | None = None) -> Config:
    """Validate a parsed config document; raise ConfigError listing every problem."""
    problems = _Problems()
    if not isinstance(raw, Mapping):
        raise ConfigError(["(top): expected a mapping"])
    problems.unknown_keys("", raw, _TOP_KEYS)

    addresses = {}
    for key, default in (("listen", Config.listen), ("admin_listen", Config.admin_listen)):
        try:
            addresses[key] = parse_address(raw[key]) if key in raw else default
        except ValueError as exc:
            problems.add(key, str(exc))
    if "listen" in addresses and addresses.get("listen") == addresses.get("admin_listen"):
        problems.add("admin_listen", "must differ from listen (the admin port is never the data port)")

    app_key = None
    if "app_key" not in raw:
        problems.add("app_key", "is required")
    else:
        app_key = _secret(problems, "app_key", raw["app_key"], environ)

    environments = _environments(problems, raw.get("environments"))
    tenants = _tenants(problems, raw.get("tenants"), environments, app_key, environ)

    routing = RoutingConfig()
    routing_raw = raw.get("routing")
    if routing_raw is not None and not isinstance(routing_raw, Mapping):
        problems.add("routing", "expected a mapping")
    elif routing_raw:
        problems.unknown_keys("routing", routing_raw, {"tenant_header", "default_tenant"})
        header = routing_raw.get("tenant_header", RoutingConfig.tenant_header)
        if header is not None and (not isinstance(header, str) or not HEADER_NAME.match(header)):
            problems.add("routing.tenant_header", "expected a header name or null")
            header = None
        default = routing_raw.get("default_tenant")
        if default is not None:
            default_id = _tenant_id(default)
            if default_id is None:
                problems.add("routing.default_tenant", "tenant id must be digits")
            elif tenants and default_id not in tenants and "tenants" in raw:
                problems.add("routing.default_tenant", f"tenant {default_id} is not configured under tenants")
            default = default_id
        routing = RoutingConfig(header, default)

    sections = {name: _section(problems, name, raw.get(name)) for name in _SECTIONS}
    if sections["upstream"].ca_file and not Path(sections["upstream"].ca_file).is_file():
        problems.add("upstream.ca_file", f"file {sections['upstream'].ca_file} does not exist")

    if problems.items:
        raise ConfigError(problems.items)
    assert app_key is not None
    return Config(
        app_key=app_key[0],
        app_key_ref=app_key[1],
        tenants=MappingProxyType(tenants),
        environments=MappingProxyType(environments),
        listen=addresses["listen"],
        admin_listen=addresses["admin_listen"],
        routing=routing,
        source=source,
        warnings=tuple(problems.warnings),
        secret_files=tuple(dict.fromkeys(problems.secret_files)),
        **sections,
    )


def load_file(path: str | Path, environ: Mapping[str, str]) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: config file cannot be read ({exc.__class__.__name__})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"]) from None
    return from_mapping(raw, environ, path)


ENV_REQUIRED = ("ST_APP_KEY", "ST_TENANT_ID", "ST_CLIENT_ID", "ST_CLIENT_SECRET")


def from_environment(environ: Mapping[str, str]) -> Config:
    """No-file mode (the twelve-factor sidecar): one tenant from ST_* variables."""
    missing = [f"env.{name}: is not set" for name in ENV_REQUIRED if not environ.get(name)]
    if missing:
        raise ConfigError(["no config file given (--config or ST_PROXY_CONFIG) and no complete environment", *missing])
    tenant: dict[str, Any] = {
        "environment": environ.get("ST_ENVIRONMENT", "production"),
        "client_id": environ["ST_CLIENT_ID"],
        "client_secret": {"env": "ST_CLIENT_SECRET"},
    }
    raw: dict[str, Any] = {"app_key": {"env": "ST_APP_KEY"}, "tenants": {environ["ST_TENANT_ID"]: tenant}}
    if environ.get("ST_AUTH_URL") or environ.get("ST_API_URL"):
        raw["environments"] = {"custom": {"auth_url": environ.get("ST_AUTH_URL"), "api_url": environ.get("ST_API_URL")}}
        if "ST_ENVIRONMENT" not in environ:
            tenant["environment"] = "custom"
    for key, var in (("listen", "ST_PROXY_LISTEN"), ("admin_listen", "ST_PROXY_ADMIN_LISTEN")):
        if environ.get(var):
            raw[key] = environ[var]
    try:
        return from_mapping(raw, environ)
    except ConfigError as exc:
        raise ConfigError([_env_path(p) for p in exc.problems]) from None


def _env_path(problem: str) -> str:
    """Name the variable, not the synthetic config path, in no-file mode errors."""
    for prefix, var in (
        ("environments.custom.auth_url", "ST_AUTH_URL"),
        ("environments.custom.api_url", "ST_API_URL"),
        ("listen", "ST_PROXY_LISTEN"),
        ("admin_listen", "ST_PROXY_ADMIN_LISTEN"),
    ):
        if problem.startswith(prefix + ":"):
            return f"env.{var}" + problem[len(prefix) :]
    if ".environment:" in problem:
        return "env.ST_ENVIRONMENT:" + problem.split(".environment:", 1)[1]
    if problem.startswith("tenants."):
        return "env.ST_TENANT_ID:" + problem.split(":", 1)[1]
    return problem


def summary(config: Config) -> list[str]:
    """The redacted description printed by `check-config`: ids, environments and secret sources, never a value."""
    lines = [
        f"source: {config.source or 'environment (no-file mode)'}",
        f"listen: {config.listen}   admin_listen: {config.admin_listen}",
        f"app_key: from {config.app_key_ref.describe()}",
        f"routing: tenant_header={config.routing.tenant_header} default_tenant={config.routing.default_tenant}",
        f"tenants: {len(config.tenants)}",
    ]
    for tenant in config.tenants.values():
        line = (
            f"  {tenant.tenant_id}: environment {tenant.environment.name} ({tenant.environment.api_url}), "
            f"client_id {tenant.client_id}, client_secret from {tenant.client_secret_ref.describe()}"
        )
        if tenant.app_key_ref != config.app_key_ref:
            line += f", app_key from {tenant.app_key_ref.describe()}"
        lines.append(line)
    return lines
