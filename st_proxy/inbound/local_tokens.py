"""Local tokens: the proxy's own bearer tokens for its clients, verifiable without any shared store.

    stp1.<base64url(name ":" secret fingerprint ":" expiry ":" nonce)>.<base64url(HMAC-SHA256(key, "stp1." payload))>

The key is derived from ``security.token_signing_key`` when set, else from the client's own secret, so every replica
and every restart that shares the config verifies the same tokens. The fingerprint binds a token to the secret that
obtained it: when that secret is rotated out or the client removed, no configured secret has that fingerprint and the
token stops verifying at once. Comparisons of fingerprints and MACs are constant-time (``hmac.compare_digest``).
A local token is opaque to its holder and is never a ServiceTitan token: the data port strips it (``headers.py``)
and sends the tenant's own token upstream.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as random_source
from dataclasses import dataclass

from ..config.clients import Client
from ..config.secrets import Secret

PREFIX = "stp1"
_KEY_CONTEXT = b"st-proxy local token key v1"
_FINGERPRINT_CONTEXT = b"st-proxy local token secret fingerprint v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fingerprint(secret: Secret) -> str:
    """A one-way digest of a client secret, long enough to tell secrets apart, carried in the token."""
    return hmac.new(_FINGERPRINT_CONTEXT, secret.reveal().encode(), hashlib.sha256).hexdigest()[:16]


def signing_key(client_name: str, secret: Secret, signing: Secret | None) -> bytes:
    """The MAC key: from ``token_signing_key`` (one key, the payload names client and secret), else per client from
    its secret (then a leaked token lets an attacker test guesses of that secret offline: check-config warns about
    short ones)."""
    if signing is not None:
        return hmac.new(signing.reveal().encode(), _KEY_CONTEXT, hashlib.sha256).digest()
    return hmac.new(secret.reveal().encode(), _KEY_CONTEXT + b" " + client_name.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Verifier:
    """One client secret's (fingerprint, key), computed once per config."""

    fingerprint: str
    key: bytes


def verifiers(client: Client, signing: Secret | None) -> tuple[Verifier, ...]:
    return tuple(Verifier(fingerprint(s), signing_key(client.name, s, signing)) for s in client.secrets)


def issue(client_name: str, verifier: Verifier, expires_at: int) -> str:
    nonce = _b64(random_source.token_bytes(12))
    payload = _b64(f"{client_name}:{verifier.fingerprint}:{expires_at}:{nonce}".encode())
    mac = hmac.new(verifier.key, f"{PREFIX}.{payload}".encode(), hashlib.sha256).digest()
    return f"{PREFIX}.{payload}.{_b64(mac)}"


@dataclass(frozen=True)
class Claims:
    client_name: str
    fingerprint: str
    expires_at: int
    signed: str  # what the MAC covers
    mac: bytes


def looks_like_token(text: str) -> bool:
    return text.startswith(PREFIX + ".")


def parse(token: str) -> Claims | None:
    """The token's claims, unverified; None for anything malformed."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        return None
    try:
        fields = _unb64(parts[1]).decode("utf-8").split(":")
        mac = _unb64(parts[2])
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if len(fields) != 4 or not fields[2].isascii() or not fields[2].isdigit() or len(mac) != 32:
        return None
    return Claims(fields[0], fields[1], int(fields[2]), f"{PREFIX}.{parts[1]}", mac)


def verify(claims: Claims, candidates: tuple[Verifier, ...], now: float) -> bool:
    """True when one of the client's current secrets signed these claims and they have not expired."""
    ok = False
    for verifier in candidates:  # every candidate is checked: the time taken does not tell which one matched
        same_secret = hmac.compare_digest(verifier.fingerprint.encode(), claims.fingerprint.encode())
        expected = hmac.new(verifier.key, claims.signed.encode(), hashlib.sha256).digest()
        ok |= same_secret & hmac.compare_digest(expected, claims.mac)
    return ok and now < claims.expires_at
