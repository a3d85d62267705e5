"""Server contexts for the forward-proxy mode: one per intercepted host, signed by the local CA, kept in a bounded cache.

A context carries a certificate for exactly the host the client named in ``CONNECT`` and nothing else: the listener
never looks at the SNI the client sends inside the tunnel, so a client cannot ask for a certificate for another name.
The contexts are ``TunnelContext`` instances that remember that host, so the data handler can tell a request that
came through a tunnel (``tunnel_host``) from one sent to the data port directly.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from .certs import LocalCA, cert_pem, key_pem
from .tunnel_context import TunnelContext, tunnel_host

__all__ = ["LeafCache", "TunnelContext", "tunnel_host"]

LEAF_DAYS = 7  # short: a leaf lives in memory only, and is made again long before it expires
RENEW_BEFORE = datetime.timedelta(days=1)
CACHE_SIZE = 64  # ServiceTitan's four names plus the configured environments' hosts fit many times over


class LeafCache:
    def __init__(
        self,
        ca: LocalCA,
        *,
        size: int = CACHE_SIZE,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.ca = ca
        self._size = size
        self._now = now
        self._contexts: OrderedDict[str, tuple[TunnelContext, datetime.datetime]] = OrderedDict()
        self.issued = 0  # leaves made so far (tests and the bench read it)

    def __len__(self) -> int:
        return len(self._contexts)

    def cached(self, host: str) -> TunnelContext | None:
        """The cached context for ``host`` while it is not due for renewal, else None."""
        entry = self._contexts.get(host)
        if entry is not None and self._now() < entry[1] - RENEW_BEFORE:
            self._contexts.move_to_end(host)
            return entry[0]
        return None

    def context(self, host: str) -> TunnelContext:
        """The context for ``host``, from the cache or signed now (a fraction of a millisecond; see certs.py)."""
        return self.cached(host) or self._store(host, *self._make(host))

    async def context_off_loop(self, host: str) -> TunnelContext:
        """``context``, with a new leaf's key generation, signing and key-file I/O in a worker thread."""
        return self.cached(host) or self._store(host, *await asyncio.to_thread(self._make, host))

    def _make(self, host: str) -> tuple[TunnelContext, datetime.datetime]:
        cert, key = self.ca.issue([host], days=LEAF_DAYS, now=self._now())
        context = TunnelContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the data port's HTTP stack speaks HTTP/1.1
        context.connect_host = host
        # The ssl module loads keys from files only: a private directory (0700), removed as soon as it is read.
        with tempfile.TemporaryDirectory(prefix="st-proxy-leaf-") as directory:
            cert_file, key_file = Path(directory) / "leaf.crt", Path(directory) / "leaf.key"
            cert_file.write_bytes(cert_pem(cert) + cert_pem(self.ca.cert))
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem(key))
            context.load_cert_chain(str(cert_file), str(key_file))
        return context, cert.not_valid_after_utc

    def _store(self, host: str, context: TunnelContext, expires: datetime.datetime) -> TunnelContext:
        self._contexts[host] = (context, expires)
        self._contexts.move_to_end(host)
        while len(self._contexts) > self._size:
            self._contexts.popitem(last=False)
        self.issued += 1
        return context
