"""Collecting a config's problems, each with its path, and reading its secret references.

Every parser adds to one ``Problems`` instead of raising, so a load reports everything wrong at once
(``tenants.42.client_secret: env var ST_X is not set``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from .secrets import Secret, SecretError, SecretRef, parse_ref, resolve
from .values import describe

# What a section parser is handed to read a secret reference at a path: (the secret, its reference), or None after
# adding the problem.
ResolveSecret = Callable[[str, object], "tuple[Secret, SecretRef] | None"]


class Problems:
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
                self.add(join(path, key), f"unknown key (expected one of: {', '.join(allowed)})")

    def mapping(self, raw: object, path: str, what: str = "a mapping") -> TypeGuard[Mapping[Any, Any]]:
        """True for a mapping; null counts as absent (False, no problem); anything else is a problem."""
        if isinstance(raw, Mapping):
            return True
        if raw is not None:
            self.add(path, f"expected {what}, got {describe(raw)}")
        return False


def join(path: str, key: object) -> str:
    """``path.key``; a key that would break the one-line-per-problem output (a newline, a space) is quoted."""
    text = str(key)
    if not text or not text.isprintable() or " " in text:
        text = repr(text)
    return f"{path}.{text}" if path else text


def config_path(base: Path | None, value: str) -> Path:
    """A path the config names: a relative one is read from the config file's directory (``base``)."""
    path = Path(value)
    return base / path if base is not None and not path.is_absolute() else path


def existing_file(base: Path | None, value: str) -> Path:
    """``config_path`` for a file that must exist now (a CA bundle, a certificate); ValueError naming the path."""
    path = config_path(base, value)
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    return path


def read_secret(
    problems: Problems, path: str, raw: object, environ: Mapping[str, str], *, header: bool = False
) -> tuple[Secret, SecretRef] | None:
    try:
        ref = parse_ref(raw)
        if ref.kind == "file":
            ref = SecretRef("file", str(config_path(problems.base, ref.where)))
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
