"""The ``clients:`` section: who may call the data port, with which secret, for which tenants (docs/security.md).

    clients:
      billing-sync:                          # [A-Za-z0-9._-]{1,64}
        secret: {env: ST_PROXY_CLIENT_BILLING}   # a secret reference, at least 16 characters
        # or, while rotating: secrets: [{file: new}, {file: old}]
        tenants: ["1234567", "7654321"]      # or ["*"]: every configured tenant

Absent or ``{}``: callers are not authenticated (allowed on a loopback data port only, ``security.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .problems import Problems, ResolveSecret
from .secrets import Secret, SecretRef
from .values import describe, parse_tenant_id

CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # used with fullmatch; no ':' so Basic's name:secret splits cleanly
MIN_SECRET_CHARS = 16
STRONG_SECRET_CHARS = 32  # below this, without token_signing_key, a leaked local token allows offline guessing
EVERY_TENANT = "*"
_KEYS = ("secret", "secrets", "tenants")

AddProblem = Callable[[str, str], None]


@dataclass(frozen=True)
class Client:
    name: str
    secrets: tuple[Secret, ...]  # any of them authenticates; the first is the current one
    secret_refs: tuple[SecretRef, ...]
    tenants: frozenset[str] | None  # None: every configured tenant ("*")

    def allows(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants


def parse_clients(raw: object, *, secret: ResolveSecret, problems: Problems) -> Mapping[str, Client]:
    """Every client, or ``problems`` (each with its path). ``secret`` resolves one secret reference."""
    if not problems.mapping(raw, "clients", "a mapping of client name to its secret and tenants"):
        return {}
    assert isinstance(raw, Mapping)
    add = problems.add
    result: dict[str, Client] = {}
    for name, spec in raw.items():
        path = f"clients.{name}" if isinstance(name, str) and CLIENT_NAME.fullmatch(name) else f"clients.{name!r}"
        if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
            add(path, "a client name is 1 to 64 letters, digits, '.', '_' or '-'")
            continue
        if not isinstance(spec, Mapping):
            add(path, f"expected a mapping with secret and tenants, got {describe(spec)}")
            continue
        problems.unknown_keys(path, spec, _KEYS)
        secrets = _secrets(path, spec, secret, add)
        tenants = _tenants(path, spec.get("tenants"), "tenants" in spec, add)
        if secrets is not None and tenants is not False:
            allowed = tenants if isinstance(tenants, frozenset) else None
            result[name] = Client(name, tuple(s for s, _ in secrets), tuple(r for _, r in secrets), allowed)
    return result


def _secrets(
    path: str, spec: Mapping[Any, Any], secret: ResolveSecret, add: AddProblem
) -> list[tuple[Secret, SecretRef]] | None:
    if ("secret" in spec) == ("secrets" in spec):
        add(f"{path}.secret", "exactly one of 'secret' or 'secrets' (a list, while rotating) is required")
        return None
    if "secret" in spec:
        refs = [(f"{path}.secret", spec["secret"])]
    else:
        listed = spec["secrets"]
        if not isinstance(listed, list) or not listed:
            add(f"{path}.secrets", f"expected a non-empty list of secret references, got {describe(listed)}")
            return None
        refs = [(f"{path}.secrets.{i}", ref) for i, ref in enumerate(listed)]
    resolved = []
    for where, ref in refs:
        got = secret(where, ref)
        if got is None:
            continue
        if len(got[0].reveal()) < MIN_SECRET_CHARS:
            # The length, never the value.
            add(
                where,
                f"a client secret needs at least {MIN_SECRET_CHARS} characters (the one from "
                f"{got[1].describe()} has {len(got[0].reveal())})",
            )
            continue
        resolved.append(got)
    return resolved if len(resolved) == len(refs) else None


def _tenants(path: str, raw: object, present: bool, add: AddProblem) -> frozenset[str] | bool | None:
    """The allowed tenant ids; None for ``["*"]``; False after a problem."""
    if not present:
        add(f"{path}.tenants", 'is required: a list of tenant ids, or ["*"] for every tenant')
        return False
    if not isinstance(raw, list) or not raw:
        add(f"{path}.tenants", f'expected a non-empty list of tenant ids or ["*"], got {describe(raw)}')
        return False
    if EVERY_TENANT in raw:
        if len(raw) > 1:
            add(f"{path}.tenants", '"*" stands for every tenant and cannot be combined with ids')
            return False
        return None
    ids = set()
    ok = True
    for i, item in enumerate(raw):
        tenant_id = parse_tenant_id(item)
        if tenant_id is None:
            add(f"{path}.tenants.{i}", 'a tenant id must be digits (or the whole list ["*"])')
            ok = False
        else:
            ids.add(tenant_id)
    return frozenset(ids) if ok else False
