"""Loading the configuration: validate a document and build the frozen model (``model.py``) from it.

Loading validates everything and reports every problem at once, each prefixed by its path
(``tenants.42.client_secret: env var ST_X is not set``), in a single ``ConfigError``. Secrets are resolved at load, so a
``Config`` that exists is complete: the request path only reads it. Nothing else in the package reads the environment,
and ``from_environment`` / ``load_file`` take it as an argument. The one-value parsers live in ``values.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

from . import env_mode, metrics
from . import tls as tls_sections
from .clients import STRONG_SECRET_CHARS, Client, parse_clients
from .limits import parse_limits, parse_state, tenant_rate
from .model import (
    BUILTIN_ENVIRONMENTS,
    CLIENT_AUTH_METHODS,
    RESERVED_HEADERS,
    Config,
    ConfigError,
    Environment,
    RoutingConfig,
    ShutdownConfig,
    Tenant,
    TokenConfig,
    UpstreamConfig,
)
from .secrets import Secret, SecretError, SecretRef, parse_ref, resolve
from .security import SecurityConfig, exposure, parse_security
from .values import (
    HEADER_NAME,
    Address,
    addresses_clash,
    describe,
    parse_address,
    parse_tenant_id,
    parse_url,
    parse_value,
    parse_yaml,
)

# Each section's settings and their kinds (values.parse_value).
_SECTIONS: dict[str, tuple[type, dict[str, Any]]] = {
    "tokens": (
        TokenConfig,
        {
            "refresh_ahead_seconds": "seconds",
            "expiry_skew_seconds": "seconds",
            "client_auth": CLIENT_AUTH_METHODS,
            "authorization_prefix": "str",
            "fetch_timeout_seconds": "positive_seconds",
            "rejected_cooloff_seconds": "seconds",
            "replay_body_limit_bytes": "int0",
            "prewarm_concurrency": "positive_int",
            "prewarm_rate_per_second": "positive_number",
            "prewarm_ready_seconds": "seconds",
            "scope": "optional_str",
        },
    ),
    "upstream": (
        UpstreamConfig,
        {
            "connect_timeout_seconds": "positive_seconds",
            "read_timeout_seconds": "positive_seconds",
            "max_connections": "positive_int",
            "ca_file": "optional_str",
        },
    ),
    "shutdown": (ShutdownConfig, {"drain_seconds": "seconds", "timeout_seconds": "seconds"}),
    "metrics": (metrics.MetricsConfig, metrics.FIELDS),
}
_TOP_KEYS = ("listen", "admin_listen", "app_key", "environments", "routing", "tenants", *_SECTIONS)
_TOP_KEYS += ("clients", "security")  # clients.py, security.py
_TOP_KEYS += ("limits", "state")  # limits.py
_TOP_KEYS += ("tls", "forward_proxy")  # tls.py
_TENANT_KEYS = ("environment", "client_id", "client_secret", "app_key", "rate_per_second")


class _Problems:
    def __init__(self, base: Path | None) -> None:
        self.base = base  # relative file paths are read from the config file's directory
        self.items: list[str] = []
        self.warnings: list[str] = []
        self.secret_files: list[Path] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")

    def unknown_keys(self, path: str, raw: Mapping[Any, Any], allowed: Any) -> None:
        for key in raw:
            if key not in allowed:
                self.add(_join(path, key), f"unknown key (expected one of: {', '.join(allowed)})")

    def mapping(self, raw: object, path: str, what: str = "a mapping") -> TypeGuard[Mapping[Any, Any]]:
        """True for a mapping; null counts as absent (False, no problem); anything else is a problem."""
        if isinstance(raw, Mapping):
            return True
        if raw is not None:
            self.add(path, f"expected {what}, got {describe(raw)}")
        return False


def _join(path: str, key: object) -> str:
    """``path.key``; a key that would break the one-line-per-problem output (a newline, a space) is quoted."""
    text = str(key)
    if not text or not text.isprintable() or " " in text:
        text = repr(text)
    return f"{path}.{text}" if path else text


def _section(problems: _Problems, name: str, raw: object) -> Any:
    cls, fields = _SECTIONS[name]
    if not problems.mapping(raw, name):
        return cls()
    problems.unknown_keys(name, raw, fields)
    values = {}
    for key, kind in fields.items():
        if key in raw:
            try:
                values[key] = parse_value(kind, raw[key])
            except ValueError as exc:
                problems.add(f"{name}.{key}", str(exc))
    return cls(**values)


def _secret(
    problems: _Problems, path: str, raw: object, environ: Mapping[str, str], *, header: bool = False
) -> tuple[Secret, SecretRef] | None:
    try:
        ref = parse_ref(raw)
        if ref.kind == "file" and problems.base is not None and not Path(ref.where).is_absolute():
            ref = SecretRef("file", str(problems.base / ref.where))
        secret = resolve(ref, environ)
    except SecretError as exc:
        problems.add(path, str(exc))
        return None
    if ref.kind == "file":
        problems.secret_files.append(Path(ref.where))
    if header and any(ord(c) < 0x20 or ord(c) == 0x7F for c in secret.reveal()):
        # It travels as the ST-App-Key header value (RFC 9110 section 5.5: no control characters). A file with two
        # trailing newlines is the usual cause. The value itself is never shown.
        problems.add(path, f"the value from {ref.describe()} contains a line break or control character")
        return None
    if ref.literal:
        problems.warnings.append(f"{path}: a literal secret in the config file; prefer {{env: ...}} or {{file: ...}}")
    return secret, ref


def _environments(problems: _Problems, raw: object) -> tuple[dict[str, Environment], set[str]]:
    """The built-in environments with the user's added or overridden; also every name the user wrote."""
    merged: dict[str, dict[str, Any]] = {name: dict(urls) for name, urls in BUILTIN_ENVIRONMENTS.items()}
    written: set[str] = set()
    for name, urls in (raw if problems.mapping(raw, "environments") else {}).items():
        path = _join("environments", name)
        written.add(str(name))
        if not isinstance(urls, Mapping):
            problems.add(path, f"expected a mapping with auth_url and api_url, got {describe(urls)}")
            merged.pop(str(name), None)
            continue
        problems.unknown_keys(path, urls, ("auth_url", "api_url"))
        overrides = {k: v for k, v in urls.items() if k in ("auth_url", "api_url")}
        merged[str(name)] = {**merged.get(str(name), {}), **overrides}
    result = {}
    for name, urls in merged.items():
        checked = {}
        for key in ("auth_url", "api_url"):
            if key not in urls:
                problems.add(f"environments.{name}.{key}", "is required")
                continue
            try:
                checked[key] = parse_url(urls[key], strip_slash=key == "api_url")
            except ValueError as exc:
                problems.add(f"environments.{name}.{key}", str(exc))
        if len(checked) == 2:
            result[name] = Environment(name, checked["auth_url"], checked["api_url"])
    return result, written


def _tenants(
    problems: _Problems,
    raw: object,
    environments: tuple[dict[str, Environment], set[str]],
    app_key: tuple[Secret, SecretRef] | None,
    environ: Mapping[str, str],
) -> dict[str, Tenant]:
    if raw is None:
        problems.add("tenants", "is required (at least one tenant)")
        return {}
    if not problems.mapping(raw, "tenants", "a mapping of tenant id to its credentials"):
        return {}
    if not raw:
        problems.add("tenants", "is empty (at least one tenant is required)")
        return {}
    known, written = environments
    result = {}
    seen: set[str] = set()  # not ``result``: an entry with problems of its own is listed too ("77" and 77)
    for key, spec in raw.items():
        tenant_id = parse_tenant_id(key)
        path = _join("tenants", key)
        if tenant_id is None:
            problems.add(path, "a tenant id must be digits")
            continue
        if tenant_id in seen:
            problems.add(path, "tenant listed twice")
            continue
        seen.add(tenant_id)
        if not isinstance(spec, Mapping):
            problems.add(path, f"expected a mapping with client_id and client_secret, got {describe(spec)}")
            continue
        problems.unknown_keys(path, spec, _TENANT_KEYS)
        env_name = str(spec.get("environment", "production"))
        environment = known.get(env_name)
        if environment is None and env_name not in written:  # a broken environment has its own problem already
            problems.add(f"{path}.environment", f"unknown environment {env_name!r} (known: {', '.join(sorted(known))})")
        client_id = spec.get("client_id")
        if "client_id" not in spec:
            problems.add(f"{path}.client_id", "is required")
        elif not isinstance(client_id, str) or not client_id.strip():
            problems.add(f"{path}.client_id", f"expected a non-empty string, got {describe(client_id)}")
        secret = None
        if "client_secret" not in spec:
            problems.add(f"{path}.client_secret", "is required")
        else:
            secret = _secret(problems, f"{path}.client_secret", spec["client_secret"], environ)
        own_key = app_key
        if "app_key" in spec:  # a scope migration: this tenant uses the new app's key (docs/servicetitan.md)
            own_key = _secret(problems, f"{path}.app_key", spec["app_key"], environ, header=True)
        rate = tenant_rate(spec, path, problems.add)
        if environment and isinstance(client_id, str) and client_id.strip() and secret and own_key:
            result[tenant_id] = Tenant(
                tenant_id, environment, client_id, secret[0], own_key[0], secret[1], own_key[1], rate
            )
    return result


def _routing(problems: _Problems, raw: object, tenants_raw: object) -> RoutingConfig:
    if not problems.mapping(raw, "routing"):
        return RoutingConfig()
    problems.unknown_keys("routing", raw, ("tenant_header", "default_tenant"))
    header = raw.get("tenant_header", RoutingConfig.tenant_header)
    if header is not None and (not isinstance(header, str) or not HEADER_NAME.fullmatch(header)):
        problems.add("routing.tenant_header", "expected a header name (letters, digits, '-') or null")
        header = None
    elif header is not None and header.lower() in RESERVED_HEADERS:
        problems.add("routing.tenant_header", f"{header} is a header the proxy sets or strips itself")
        header = None
    default = raw.get("default_tenant")
    if default is not None:
        default = parse_tenant_id(default)
        if default is None:
            problems.add("routing.default_tenant", "a tenant id must be digits")
        elif isinstance(tenants_raw, Mapping) and default not in {parse_tenant_id(k) for k in tenants_raw}:
            # Compared with the ids as written, so a tenant with a problem of its own does not cause a second one here.
            problems.add("routing.default_tenant", f"tenant {default} is not configured under tenants")
    return RoutingConfig(header, default)


def from_mapping(raw: object, environ: Mapping[str, str], source: Path | None = None) -> Config:
    """Validate a parsed config document; raise ConfigError listing every problem."""
    if raw is None:
        raise ConfigError(["(top): the config is empty; it needs at least app_key and tenants"])
    if not isinstance(raw, Mapping):
        raise ConfigError([f"(top): expected a mapping of settings, got {describe(raw)}"])
    problems = _Problems(source.absolute().parent if source is not None else None)
    problems.unknown_keys("", raw, _TOP_KEYS)

    addresses = {}
    for key, default in (("listen", Config.listen), ("admin_listen", Config.admin_listen)):
        try:
            addresses[key] = parse_address(raw[key]) if key in raw else default
        except ValueError as exc:
            problems.add(key, str(exc))
    if len(addresses) == 2 and addresses_clash(addresses["listen"], addresses["admin_listen"]):
        problems.add(
            "admin_listen",
            f"{addresses['admin_listen']} clashes with listen {addresses['listen']}: the "
            "admin port is never the data port",
        )

    app_key = None
    if "app_key" not in raw:
        problems.add("app_key", "is required")
    else:
        app_key = _secret(problems, "app_key", raw["app_key"], environ, header=True)

    environments = _environments(problems, raw.get("environments"))
    tenants = _tenants(problems, raw.get("tenants"), environments, app_key, environ)
    routing = _routing(problems, raw.get("routing"), raw.get("tenants"))
    sections = {name: _section(problems, name, raw.get(name)) for name in _SECTIONS}
    ca_file = sections["upstream"].ca_file
    if ca_file and problems.base is not None and not Path(ca_file).is_absolute():
        ca_file = str(problems.base / ca_file)
        sections["upstream"] = replace(sections["upstream"], ca_file=ca_file)
    if ca_file and not Path(ca_file).is_file():
        problems.add("upstream.ca_file", f"file {ca_file} does not exist")
    tls_config = tls_sections.parse(problems, raw)
    limits = parse_limits(raw.get("limits"), problems.add)
    state = parse_state(
        raw.get("state"), problems.add, lambda path, ref: _secret(problems, path, ref, environ), problems.base
    )
    prefix = sections["tokens"].authorization_prefix
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        problems.add("tokens.authorization_prefix", "must not contain control characters (it starts a header value)")

    tls = tls_config["tls"]
    # A client_ca_file that failed to load has its own problem above; the rule judges what the config asks for.
    mtls = tls_sections.authenticates_callers(tls) or bool(
        isinstance(raw.get("tls"), Mapping) and raw["tls"].get("client_ca_file")
    )
    clients, security = _callers(
        problems, raw, environ, addresses.get("listen"), mtls=mtls, tls=tls is not None or raw.get("tls") is not None
    )
    refused, warned = tls_sections.forward_proxy_exposure(
        tls_config["forward_proxy"], clients=len(clients), security=security
    )
    problems.items.extend(refused)
    problems.warnings.extend(warned)

    if problems.items:
        raise ConfigError(problems.items)
    assert app_key is not None
    return Config(
        app_key=app_key[0],
        app_key_ref=app_key[1],
        tenants=MappingProxyType(tenants),
        environments=MappingProxyType(environments[0]),
        listen=addresses["listen"],
        admin_listen=addresses["admin_listen"],
        routing=routing,
        source=source,
        warnings=tuple(problems.warnings),
        secret_files=tuple(dict.fromkeys(problems.secret_files)),
        **sections,
        **tls_config,
        clients=MappingProxyType(dict(clients)),
        security=security,
        limits=limits,
        state=state,
    )


def _callers(
    problems: _Problems,
    raw: Mapping[Any, Any],
    environ: Mapping[str, str],
    listen: Address | None,
    *,
    mtls: bool = False,
    tls: bool = False,
) -> tuple[Mapping[str, Client], SecurityConfig]:
    """``clients`` and ``security`` (clients.py, security.py), and the closed-by-default rule for the data port."""

    def secret(path: str, ref: object) -> tuple[Secret, SecretRef] | None:
        return _secret(problems, path, ref, environ, header=True)

    clients = parse_clients(raw.get("clients"), secret=secret, add=problems.add)
    security = parse_security(raw.get("security"), secret=secret, add=problems.add)
    if listen is not None and not ("clients" in raw and raw["clients"] and not clients):  # broken clients: said above
        refused, warned = exposure(listen, clients=len(clients), client_certificates=mtls, security=security, tls=tls)
        problems.items.extend(refused)
        problems.warnings.extend(warned)
    if security.token_signing_key is None:
        for client in clients.values():
            for ref, value in zip(client.secret_refs, client.secrets, strict=True):
                if len(value.reveal()) < STRONG_SECRET_CHARS:
                    problems.warnings.append(
                        f"clients.{client.name}: the secret from {ref.describe()} has fewer than {STRONG_SECRET_CHARS} "
                        "characters and no security.token_signing_key is set: local tokens are signed with a key "
                        "derived from it, so a leaked token allows guessing it offline"
                    )
    return clients, security


def load_file(path: str | Path, environ: Mapping[str, str]) -> Config:
    """Read, parse and validate a YAML config file. Problems with the file itself are prefixed by its path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file does not exist"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: config file cannot be read: {exc.strerror or type(exc).__name__}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config file is not UTF-8 text"]) from None
    try:
        raw = parse_yaml(text)
    except ValueError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    try:
        return from_mapping(raw, environ, path)
    except ConfigError as exc:
        # Parsed once: the reloader watches these for a retry (a Secret that lands after the ConfigMap naming it).
        raise ConfigError(exc.problems, files=tuple(file_refs(raw, path))) from None


def file_refs(raw: object, source: Path) -> list[Path]:
    """Every ``{file: ...}`` path a parsed document names, found without validating it; relative paths are read from
    the config file's directory, as ``from_mapping`` reads them."""
    base = source.absolute().parent
    return [base / p for p in _file_refs(raw)]


def _file_refs(node: object) -> Iterator[str]:
    if isinstance(node, Mapping):
        if len(node) == 1 and isinstance(node.get("file"), str):
            yield node["file"]
            return
        for value in node.values():
            yield from _file_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _file_refs(value)


def from_environment(environ: Mapping[str, str]) -> Config:
    """No-file mode (the twelve-factor sidecar): one tenant from ST_* variables (env_mode.py). Errors name the
    variable (``env.ST_TENANT_ID: a tenant id must be digits``)."""
    raw, env_name, missing = env_mode.document(environ)
    if missing:
        # Validate the rest too, with harmless stand-ins for what is missing, so every problem is listed at once.
        stand_in = {**environ, **{name: "0" for name in env_mode.REQUIRED if not environ.get(name)}}
        raw, env_name, _ = env_mode.document(stand_in)
        try:
            from_mapping(raw, stand_in)
        except ConfigError as exc:
            missing += [env_mode.rename(problem, env_name) for problem in exc.problems]
        raise ConfigError(missing)
    try:
        return from_mapping(raw, environ)
    except ConfigError as exc:
        raise ConfigError([env_mode.rename(problem, env_name) for problem in exc.problems]) from None
