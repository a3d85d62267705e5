"""Reading what a caller presents in ``Authorization``: a local token (``Bearer`` or bare) or HTTP Basic.

Basic credentials come raw (RFC 7617: ``base64(name ":" secret)``) or form-encoded first (RFC 6749 section 2.3.1,
which OAuth client libraries follow); both are accepted, on the data port and at the token endpoint alike. Nothing
here logs or keeps what it read.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote_plus

from .local_tokens import looks_like_token


@dataclass(frozen=True)
class Basic:
    candidates: tuple[tuple[str, str], ...]  # (name, secret) as sent, then form-decoded when that differs


@dataclass(frozen=True)
class Bearer:
    token: str


def read_authorization(value: str | None) -> Basic | Bearer | None:
    """What the header presents, or None when there is nothing usable."""
    if not value:
        return None
    scheme, rest = split_scheme(value)
    if scheme.lower() == "bearer":
        return Bearer(rest) if rest else None
    if scheme.lower() == "basic":
        return read_basic(rest)
    if not rest and looks_like_token(scheme):  # the bare token, as some ServiceTitan libraries send it
        return Bearer(scheme)
    return None


def split_scheme(value: str) -> tuple[str, str]:
    """(the scheme as sent, the credentials after it), both stripped. Compare the scheme case-insensitively
    (RFC 9110 section 11.1); the credentials keep their case (a local token's base64url does)."""
    scheme, _, rest = value.strip().partition(" ")
    return scheme, rest.strip()


def read_basic(encoded: str) -> Basic | None:
    try:
        text = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    name, colon, secret = text.partition(":")
    if not colon:
        return None
    candidates = [(name, secret)]
    decoded = (unquote_plus(name), unquote_plus(secret))
    if decoded != (name, secret):
        candidates.append(decoded)
    return Basic(tuple(candidates))
