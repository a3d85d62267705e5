"""The parsers ``config.py`` builds on, one value at a time: strict YAML, listen addresses, URLs, numbers, tenant ids.

Nothing here knows the shape of the config; each function raises ``ValueError`` with a message that fits after a
config path (``upstream.read_timeout_seconds: expected a number of seconds >= 0``) and never echoes a secret.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

TENANT_ID = re.compile(r"[0-9]{1,20}")  # ServiceTitan tenant ids are 64-bit integers; used with fullmatch
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2 token; used with fullmatch
WILDCARD_HOSTS = ("0.0.0.0", "::")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: object) -> Address:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (all IPv4 interfaces). Port 0 picks a free port."""
    if not isinstance(text, str):
        raise ValueError("expected HOST:PORT, [IPV6]:PORT or :PORT")
    host, sep, port = text.rpartition(":")
    # isascii: str.isdigit alone accepts "²", which int() then refuses.
    if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, [IPV6]:PORT or :PORT with a port 0-65535, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"an IPv6 address needs brackets ([::1]:8080), got {text!r}")
    return Address(host or "0.0.0.0", int(port))


def addresses_clash(a: Address, b: Address) -> bool:
    """Would binding both fail? Port 0 never clashes (each bind picks its own); a wildcard host covers every host."""
    if a.port != b.port or a.port == 0:
        return False
    return a.host == b.host or a.host in WILDCARD_HOSTS or b.host in WILDCARD_HOSTS


def is_loopback(address: Address) -> bool:
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return address.host == "localhost"


def parse_url(value: object, *, strip_slash: bool) -> str:
    """An http(s) URL without credentials, query or fragment."""
    if not isinstance(value, str):
        raise ValueError(f"expected an http(s) URL, got {describe(value)}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parts.username is not None or parts.password is not None:
        # Not echoed: the user part may hold a password.
        raise ValueError("must not carry credentials (user:password@); the tenant's client_id and secret are used")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    if parts.query or parts.fragment:
        # Not echoed: a query may carry a credential (?client_secret=...).
        raise ValueError("must not carry a query or fragment")
    # The caller's path is appended to an api_url as is, so a trailing slash would double up; a token URL is used
    # exactly as written.
    return value.rstrip("/") if strip_slash else value


def describe(raw: object) -> str:
    """What the YAML held, in words ("a list"), for messages that must not echo a value."""
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, (int, float)):
        return "a number"
    names: dict[type, str] = {str: "a string", list: "a list", dict: "a mapping"}
    return names.get(type(raw), type(raw).__name__)


def parse_tenant_id(raw: object) -> str | None:
    """A tenant id as written (an unquoted YAML number or a string of digits), or None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int) and raw >= 0:
        return str(raw)
    if isinstance(raw, str) and TENANT_ID.fullmatch(raw):
        return raw
    return None


def parse_value(kind: str | tuple[str, ...], raw: object) -> Any:
    """One setting. ``kind``: seconds, positive_seconds, positive_number, positive_int, int0, bool, str, optional_str,
    or a tuple of choices."""
    if isinstance(kind, tuple):
        if raw not in kind:
            raise ValueError(f"expected one of {', '.join(kind)}")
        return raw
    if kind in ("seconds", "positive_seconds"):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
            raise ValueError("expected a number of seconds >= 0")
        if kind == "positive_seconds" and raw == 0:
            raise ValueError("must be greater than 0")
        return raw
    if kind == "positive_number":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw <= 0:
            raise ValueError("expected a number greater than 0")
        return raw
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {describe(raw)}")
        return raw
    if kind in ("positive_int", "int0"):
        least = 1 if kind == "positive_int" else 0
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < least:
            raise ValueError(f"expected a whole number >= {least}")
        return raw
    if kind == "str":
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {describe(raw)}")
        return raw
    if raw is not None and not isinstance(raw, str):  # optional_str
        raise ValueError(f"expected a string or null, got {describe(raw)}")
    return raw


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping that refuses a key written twice: PyYAML would silently keep the last one, so a second ``tenants:``
    block or a repeated tenant id would drop credentials without a word."""
    loader.flatten_mapping(node)  # YAML merge keys (<<) first, as SafeLoader does
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) or key is None:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


class PureStrictLoader(yaml.SafeLoader):
    """SafeLoader with the duplicate-key check: PyYAML's pure-Python parser."""


# libyaml's parser (CSafeLoader) reads a 5,000-tenant config several times faster; the construction, and with it the
# duplicate-key check, stays PyYAML's own Python code. PyYAML built without libyaml falls back to the pure parser.
_FastBase: type = getattr(yaml, "CSafeLoader", PureStrictLoader)


class StrictLoader(_FastBase):
    """The loader configs are read with: libyaml's where available, with the duplicate-key check."""


for _loader in (PureStrictLoader, StrictLoader):
    _loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, *, loader: type = StrictLoader) -> object:
    """The YAML document; a syntax error raises ``invalid YAML at line L, column C: problem``."""
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # Only PyYAML's description of the problem, not its context snippet: that would quote the file's text,
        # literal secrets included.
        problem = getattr(exc, "problem", None) or "not a single YAML document"
        raise ValueError(f"invalid YAML{at}: {problem}") from None
