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
from typing import Any

from . import env_mode, metrics
from . import tls as tls_sections
from .clients import STRONG_SECRET_CHARS, Client, parse_clients
from .limits import parse_limits, parse_state
from .model import (
    CLIENT_AUTH_METHODS,
    Config,
    ConfigError,
    ShutdownConfig,
    TokenConfig,
    UpstreamConfig,
)
from .problems import Problems, existing_file, read_secret
from .secrets import Secret, SecretRef
from .security import SecurityConfig, exposure, parse_security
from .tenants import parse_environments, parse_routing, parse_tenants
from .values import (
    Address,
    addresses_clash,
    describe,
    parse_address,
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


def _section(problems: Problems, name: str, raw: object) -> Any:
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


def from_mapping(raw: object, environ: Mapping[str, str], source: Path | None = None) -> Config:
    """Validate a parsed config document; raise ConfigError listing every problem."""
    if raw is None:
        raise ConfigError(["(top): the config is empty; it needs at least app_key and tenants"])
    if not isinstance(raw, Mapping):
        raise ConfigError([f"(top): expected a mapping of settings, got {describe(raw)}"])
    problems = Problems(source.absolute().parent if source is not None else None)
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
        app_key = read_secret(problems, "app_key", raw["app_key"], environ, header=True)

    environments = parse_environments(problems, raw.get("environments"))
    tenants = parse_tenants(problems, raw.get("tenants"), environments, app_key, environ)
    routing = parse_routing(problems, raw.get("routing"), raw.get("tenants"))
    sections = {name: _section(problems, name, raw.get(name)) for name in _SECTIONS}
    if sections["upstream"].ca_file:
        try:
            ca_file = str(existing_file(problems.base, sections["upstream"].ca_file))
            sections["upstream"] = replace(sections["upstream"], ca_file=ca_file)
        except ValueError as exc:
            problems.add("upstream.ca_file", str(exc))
    tls_config = tls_sections.parse(problems, raw)
    limits = parse_limits(raw.get("limits"), problems.add)
    state = parse_state(
        raw.get("state"), problems.add, lambda path, ref: read_secret(problems, path, ref, environ), problems.base
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
    problems: Problems,
    raw: Mapping[Any, Any],
    environ: Mapping[str, str],
    listen: Address | None,
    *,
    mtls: bool = False,
    tls: bool = False,
) -> tuple[Mapping[str, Client], SecurityConfig]:
    """``clients`` and ``security`` (clients.py, security.py), and the closed-by-default rule for the data port."""

    def secret(path: str, ref: object) -> tuple[Secret, SecretRef] | None:
        return read_secret(problems, path, ref, environ, header=True)

    clients = parse_clients(raw.get("clients"), secret=secret, problems=problems)
    security = parse_security(raw.get("security"), secret=secret, problems=problems)
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
