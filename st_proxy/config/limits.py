"""The ``limits`` and ``state`` sections, and a tenant's own ``rate_per_second`` (docs/limits.md).

``limits`` absent means nothing is paced or capped and upstream 429s pass through as before; ``state`` absent means
the pacing state lives in each process. A Redis URL's userinfo never appears in any output: ``redacted_url`` is the
only form printed, and a password belongs in ``state.password`` (a secret reference), never in the URL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .problems import existing_file
from .secrets import Secret, SecretRef
from .values import describe

_LIMIT_KEYS = (
    "rate_per_second",
    "burst",
    "max_wait_seconds",
    "max_concurrent_per_tenant",
    "reports_per_minute",
    "retry_throttled",
)
_STATE_KEYS = ("redis_url", "password", "ca_file", "key_prefix", "timeout_ms", "fallback_rate_fraction")


@dataclass(frozen=True)
class LimitsConfig:
    rate_per_second: float | None = 50  # per (environment, app key, tenant), summed over every process; None: unpaced
    burst: int = 10
    max_wait_seconds: float = 5  # one deadline for all waiting: the concurrency slot, then the rate slot
    max_concurrent_per_tenant: int | None = 20  # per process; None: no cap
    reports_per_minute: float | None = 1  # per (tenant, report) on the report-data endpoint; None: unpaced
    retry_throttled: bool = True


@dataclass(frozen=True)
class StateConfig:
    redis_url: str | None = None  # None: in-process state
    password: Secret | None = None
    password_ref: SecretRef | None = None
    ca_file: str | None = None
    key_prefix: str = "st-proxy:"
    timeout_ms: float = 100
    fallback_rate_fraction: float = 0.5

    @property
    def redacted_url(self) -> str | None:
        return redact_url(self.redis_url) if self.redis_url else None

    def describe(self) -> str:
        if not self.redis_url:
            return "in-process (each process paces alone)"
        password = f", password from {self.password_ref.describe()}" if self.password_ref else ""
        return f"redis {self.redacted_url}{password}, fallback_rate_fraction {self.fallback_rate_fraction}"


def redact_url(url: str) -> str:
    """The URL with any ``user:password@`` replaced by ``***@``: the only form of a state URL that is ever shown."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if "@" in url else url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{tail}"


def _number(raw: object, *, least: float, strict: bool = False, whole: bool = False, null: bool = False) -> Any:
    if raw is None and null:
        return None
    number = not isinstance(raw, bool) and isinstance(raw, (int, float)) and math.isfinite(raw)
    if not (
        number
        and isinstance(raw, (int, float))
        and (raw > least if strict else raw >= least)
        and (not whole or isinstance(raw, int))
    ):
        what = "a whole number" if whole else "a number"
        bound = f"> {least:g}" if strict else f">= {least:g}"
        raise ValueError(f"expected {what} {bound}{' or null' if null else ''}")
    return raw


def rate_value(raw: object) -> float | None:
    """A ``rate_per_second``: a number > 0, or null for no pacing."""
    return _number(raw, least=0, strict=True, null=True)


_LIMIT_PARSERS: dict[str, Callable[[object], Any]] = {
    "rate_per_second": rate_value,
    "burst": lambda raw: _number(raw, least=1, whole=True),
    "max_wait_seconds": lambda raw: _number(raw, least=0),
    "max_concurrent_per_tenant": lambda raw: _number(raw, least=1, whole=True, null=True),
    "reports_per_minute": lambda raw: _number(raw, least=0, strict=True, null=True),
}


def parse_limits(raw: object, add: Callable[[str, str], None]) -> LimitsConfig | None:
    """The ``limits`` section; ``add(path, message)`` records each problem. Absent or null: None (feature off)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        add("limits", f"expected a mapping, got {describe(raw)}")
        return None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _LIMIT_KEYS:
            add(f"limits.{key}", f"unknown key (expected one of: {', '.join(_LIMIT_KEYS)})")
        elif key == "retry_throttled":
            if isinstance(value, bool):
                values[key] = value
            else:
                add("limits.retry_throttled", f"expected true or false, got {describe(value)}")
        else:
            try:
                values[key] = _LIMIT_PARSERS[key](value)
            except ValueError as exc:
                add(f"limits.{key}", str(exc))
    return LimitsConfig(**values)


def parse_redis_url(raw: object) -> str | None:
    """``redis://host:port/db`` or ``rediss://``; null for in-process state. Never echoes the value: it may carry a
    password someone pasted into it."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"expected a redis:// or rediss:// URL or null, got {describe(raw)}")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise ValueError(f"not a valid URL: {redact_url(raw)}") from None
    if parts.password is not None:
        raise ValueError(f"must not carry a password ({redact_url(raw)}); put it in state.password")
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"expected a redis:// or rediss:// URL with a host, got {redact_url(raw)}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    db = parts.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"the path must be a database number (/0), got {redact_url(raw)}")
    del port
    return raw


def parse_state(
    raw: object,
    add: Callable[[str, str], None],
    secret: Callable[[str, object], tuple[Secret, SecretRef] | None],
    base: Path | None,
) -> StateConfig:
    """The ``state`` section. ``secret(path, raw)`` resolves a secret reference the way the rest of the config does."""
    if raw is None:
        return StateConfig()
    if not isinstance(raw, Mapping):
        add("state", f"expected a mapping, got {describe(raw)}")
        return StateConfig()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"state.{key}"
        try:
            if key not in _STATE_KEYS:
                add(path, f"unknown key (expected one of: {', '.join(_STATE_KEYS)})")
            elif key == "redis_url":
                values[key] = parse_redis_url(value)
            elif key == "password":
                if value is not None:
                    resolved = secret(path, value)
                    if resolved is not None:
                        values["password"], values["password_ref"] = resolved
            elif key == "ca_file":
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"expected a file path or null, got {describe(value)}")
                values[key] = str(existing_file(base, value)) if value else value
            elif key == "key_prefix":
                if not isinstance(value, str) or len(value) > 64 or not value.isprintable():
                    raise ValueError("expected a printable string of at most 64 characters")
                values[key] = value
            elif key == "timeout_ms":
                values[key] = _number(value, least=0, strict=True)
            else:  # fallback_rate_fraction
                values[key] = _number(value, least=0, strict=True)
                if value > 1:
                    raise ValueError("expected a number > 0 and <= 1 (1/N for N replicas)")
        except ValueError as exc:
            add(path, str(exc))
    state = StateConfig(**values)
    if state.ca_file and state.redis_url and not state.redis_url.startswith("rediss://"):
        add("state.ca_file", "is only used with a rediss:// URL")
    return state


def tenant_rate(spec: Mapping[Any, Any], path: str, add: Callable[[str, str], None]) -> float | None:
    """A tenant's own ``rate_per_second`` (beside its credentials), or None to use ``limits.rate_per_second``."""
    if "rate_per_second" not in spec:
        return None
    try:
        return _number(spec["rate_per_second"], least=0, strict=True)
    except ValueError as exc:
        add(f"{path}.rate_per_second", str(exc))
        return None
