"""The parts of a config that name tenants: environments, tenants and routing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .limits import tenant_rate
from .model import BUILTIN_ENVIRONMENTS, RESERVED_HEADERS, Environment, RoutingConfig, Tenant
from .problems import Problems, join, read_secret
from .secrets import Secret, SecretRef
from .values import HEADER_NAME, describe, parse_tenant_id, parse_url

TENANT_KEYS = ("environment", "client_id", "client_secret", "app_key", "rate_per_second")


def parse_environments(problems: Problems, raw: object) -> tuple[dict[str, Environment], set[str]]:
    """The built-in environments with the user's added or overridden; also every name the user wrote."""
    merged: dict[str, dict[str, Any]] = {name: dict(urls) for name, urls in BUILTIN_ENVIRONMENTS.items()}
    written: set[str] = set()
    for name, urls in (raw if problems.mapping(raw, "environments") else {}).items():
        path = join("environments", name)
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


def parse_tenants(
    problems: Problems,
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
        path = join("tenants", key)
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
        problems.unknown_keys(path, spec, TENANT_KEYS)
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
            secret = read_secret(problems, f"{path}.client_secret", spec["client_secret"], environ)
        own_key = app_key
        if "app_key" in spec:  # a scope migration: this tenant uses the new app's key (docs/servicetitan.md)
            own_key = read_secret(problems, f"{path}.app_key", spec["app_key"], environ, header=True)
        rate = tenant_rate(spec, path, problems.add)
        if environment and isinstance(client_id, str) and client_id.strip() and secret and own_key:
            result[tenant_id] = Tenant(
                tenant_id, environment, client_id, secret[0], own_key[0], secret[1], own_key[1], rate
            )
    return result


def parse_routing(problems: Problems, raw: object, tenants_raw: object) -> RoutingConfig:
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
