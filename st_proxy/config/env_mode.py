"""No-file mode (the twelve-factor sidecar): the config document that ST_* variables describe, and the renaming of
its problems so that each names the variable to fix rather than a config path the user never wrote.

    ST_APP_KEY, ST_TENANT_ID, ST_CLIENT_ID, ST_CLIENT_SECRET   required
    ST_ENVIRONMENT                                             default production (custom when ST_AUTH_URL/ST_API_URL)
    ST_AUTH_URL, ST_API_URL                                    the URLs of that environment
    ST_PROXY_LISTEN, ST_PROXY_ADMIN_LISTEN                     the listen addresses
    ST_PROXY_CLIENT_SECRET                                     one client, `default`, allowed every tenant
    ST_PROXY_ALLOW_UNAUTHENTICATED                             true: a non-loopback listen without clients

``config.from_environment`` validates the document like any config file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REQUIRED = ("ST_APP_KEY", "ST_TENANT_ID", "ST_CLIENT_ID", "ST_CLIENT_SECRET")
_URLS = (("auth_url", "ST_AUTH_URL"), ("api_url", "ST_API_URL"))
_LISTEN = (("listen", "ST_PROXY_LISTEN"), ("admin_listen", "ST_PROXY_ADMIN_LISTEN"))
CLIENT = "default"
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def document(environ: Mapping[str, str]) -> tuple[dict[str, Any], str, list[str]]:
    """(config document, environment name, problems with required variables)."""
    missing = [f"env.{name}: is not set (or empty)" for name in REQUIRED if not environ.get(name)]
    if missing:
        missing.insert(
            0, "env: no config file (--config or ST_PROXY_CONFIG), so the ST_* variables must describe one tenant"
        )
    urls = {key: environ[var] for key, var in _URLS if environ.get(var)}
    # ST_AUTH_URL / ST_API_URL set the URLs of the environment ST_ENVIRONMENT names (overriding a built-in one, as an
    # `environments:` entry in a file would); with no ST_ENVIRONMENT they make one called "custom".
    env_name = environ.get("ST_ENVIRONMENT") or ("custom" if urls else "production")
    tenant = {
        "environment": env_name,
        "client_id": environ.get("ST_CLIENT_ID"),
        "client_secret": {"env": "ST_CLIENT_SECRET"},
    }
    raw: dict[str, Any] = {"app_key": {"env": "ST_APP_KEY"}, "tenants": {environ.get("ST_TENANT_ID"): tenant}}
    if urls:
        raw["environments"] = {env_name: urls}
    raw.update({key: environ[var] for key, var in _LISTEN if environ.get(var)})
    if environ.get("ST_PROXY_CLIENT_SECRET"):
        raw["clients"] = {CLIENT: {"secret": {"env": "ST_PROXY_CLIENT_SECRET"}, "tenants": ["*"]}}
    allow = environ.get("ST_PROXY_ALLOW_UNAUTHENTICATED")
    if allow:
        # An unknown word stays a string, which the loader refuses under the variable's name (rename below).
        raw["security"] = {"allow_unauthenticated": _BOOLEANS.get(allow.strip().lower(), allow)}
    return raw, env_name, missing


def rename(problem: str, env_name: str) -> str:
    """``tenants.abc: a tenant id must be digits`` -> ``env.ST_TENANT_ID: a tenant id must be digits``."""
    path, _, message = problem.partition(": ")
    if path == "listen" and "no clients are configured" in message:
        return (
            "env.ST_PROXY_LISTEN: " + message.split(". Add clients")[0] + ". Set ST_PROXY_CLIENT_SECRET (callers "
            "then authenticate as client `default`), listen on 127.0.0.1, or set ST_PROXY_ALLOW_UNAUTHENTICATED=true"
        )
    names = dict(_LISTEN)
    names.update({f"environments.{env_name}.{key}": var for key, var in _URLS})
    if path in names:
        var = names[path]
        if message == "is required":  # the other URL was given, this one not
            other = "ST_API_URL" if var == "ST_AUTH_URL" else "ST_AUTH_URL"
            message = f"is not set (a custom environment needs it with {other})"
        return f"env.{var}: {message}"
    if path.startswith(f"clients.{CLIENT}."):
        return f"env.ST_PROXY_CLIENT_SECRET: {message}"
    if path == "security.allow_unauthenticated":
        return f"env.ST_PROXY_ALLOW_UNAUTHENTICATED: {message}"
    if path.endswith(".environment"):
        return f"env.ST_ENVIRONMENT: {message}"
    if path.endswith(".client_id"):
        return f"env.ST_CLIENT_ID: {message}"
    if path.startswith("tenants."):
        return f"env.ST_TENANT_ID: {message}"
    return problem
