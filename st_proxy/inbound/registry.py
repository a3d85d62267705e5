"""The clients of one config, ready for the request path: secrets to compare and local-token keys, computed once."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import Config
from ..config.clients import Client
from . import local_tokens
from .local_tokens import Verifier


@dataclass(frozen=True)
class Entry:
    client: Client
    secrets: tuple[bytes, ...]
    verifiers: tuple[Verifier, ...]  # one per secret, same order


class ClientRegistry:
    def __init__(self, config: Config) -> None:
        signing = config.security.token_signing_key
        self.entries: Mapping[str, Entry] = {
            name: Entry(
                client,
                tuple(s.reveal().encode() for s in client.secrets),
                local_tokens.verifiers(client, signing),
            )
            for name, client in config.clients.items()
        }

    def __bool__(self) -> bool:
        return bool(self.entries)

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def secret_index(self, entry: Entry, secret: str) -> int | None:
        """Which of the client's secrets this is, or None. Every listed secret is compared, in constant time each."""
        given = secret.encode()
        found = None
        for i, known in enumerate(entry.secrets):
            if hmac.compare_digest(known, given) and found is None:
                found = i
        return found
