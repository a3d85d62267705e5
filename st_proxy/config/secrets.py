"""Secret references: a literal, an environment variable, or a file.

A reference is written in the config as a plain string (a literal, which `check-config` warns about) or as a mapping
with exactly one of ``value``, ``env``, ``file`` (the oauth2-proxy shape). ``resolve`` turns it into a ``Secret``,
whose ``repr`` and ``str`` are redacted: the only way to the value is ``.reveal()``, so a secret cannot reach a log line
or an exception message by accident.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

KINDS = ("value", "env", "file")


class SecretError(ValueError):
    """A reference that cannot be resolved. The message names the source, never a value."""


class Secret:
    """A resolved secret value with a redacted representation."""

    __slots__ = ("_fingerprint", "_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source
        # Computed once: the token cache key uses it on every request (Tenant.credentials_key).
        self._fingerprint = hashlib.sha256(value.encode()).hexdigest()[:16]

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """A short, one-way digest: enough to tell a rotated secret from the old one, useless to an attacker."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Secret(<redacted>, source={self.source!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from, as written in the config."""

    kind: str  # one of KINDS
    where: str  # the literal (kind "value"), variable name or file path

    @property
    def literal(self) -> bool:
        return self.kind == "value"

    def describe(self) -> str:
        if self.kind == "env":
            return f"env {self.where}"
        if self.kind == "file":
            return f"file {self.where}"
        return "a literal in the config"

    def __repr__(self) -> str:
        where = "<redacted>" if self.kind == "value" else repr(self.where)
        return f"SecretRef({self.kind}, {where})"


def parse_ref(raw: object) -> SecretRef:
    """Read a reference as written in the config; raise SecretError with a message fit for a path-prefixed list."""
    if isinstance(raw, str):
        if not raw:
            raise SecretError("is empty")
        return SecretRef("value", raw)
    if isinstance(raw, Mapping):
        keys = list(raw)
        if len(keys) != 1 or keys[0] not in KINDS:
            raise SecretError("a secret reference needs exactly one of 'value', 'env', 'file'")
        kind = keys[0]
        where = raw[kind]
        if not isinstance(where, str) or not where:
            raise SecretError(f"'{kind}' must be a non-empty string")
        return SecretRef(kind, where)
    raise SecretError("expected a string or a mapping with one of 'value', 'env', 'file'")


def resolve(ref: SecretRef, environ: Mapping[str, str] | None = None) -> Secret:
    """Read the secret now. Values read from a file lose one trailing newline (as `echo` and Kubernetes leave them)."""
    env = os.environ if environ is None else environ
    if ref.kind == "value":
        return Secret(ref.where, ref.describe())
    if ref.kind == "env":
        value = env.get(ref.where)
        if value is None:
            raise SecretError(f"env var {ref.where} is not set")
        if not value:
            raise SecretError(f"env var {ref.where} is empty")
        if value.isspace():
            raise SecretError(f"env var {ref.where} holds only whitespace")
        return Secret(value, ref.describe())
    try:
        text = Path(ref.where).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretError(f"file {ref.where} does not exist") from None
    except OSError as exc:
        raise SecretError(f"file {ref.where} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"file {ref.where} is not UTF-8 text") from None
    value = text.removesuffix("\n").removesuffix("\r")
    if not value:
        raise SecretError(f"file {ref.where} is empty")
    if value.isspace():  # a file saved with only a newline or indentation: no credential, whatever was meant
        raise SecretError(f"file {ref.where} holds only whitespace")
    return Secret(value, ref.describe())
