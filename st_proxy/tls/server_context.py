"""The data port's TLS: certificate rotation without a restart, and client CAs that can be taken back.

An asyncio server is bound with one ``SSLContext`` for its whole life, so renewing a certificate means choosing the
context per connection. The listener's context has an SNI callback, which OpenSSL runs on every ClientHello (with
``server_name`` None when the client sent no SNI, as for an IP address); it sets ``ssl_object.context`` to the current
context (``SSL_set_SSL_CTX``), whose certificate, key and client-CA store then serve that handshake. Each renewal
builds a fresh context from the files (``config/tls.server_context``) rather than loading into the live one: loading
a CA bundle into a context only adds to it, so a CA removed from ``client_ca_file`` would stay trusted, and loading a
certificate replaces it before the key is checked. Connections already open keep the context they started with.

What stays with the listener's own context: the verify mode (whether a client certificate is required), fixed at
start; ``config/tls.pin_listeners`` keeps a reload from switching client certificates on or off.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from ..config import Config, ConfigError, TLSConfig
from ..config.file_watch import snapshot
from ..config.tls import describe_ssl_error, server_context

log = logging.getLogger("st_proxy.tls")


def build(tls: TLSConfig) -> ssl.SSLContext:
    try:
        context = server_context(tls)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError([f"tls: {tls.cert_file}, {tls.key_file}: {describe_ssl_error(exc)}"]) from None
    context.set_alpn_protocols(["http/1.1"])  # the data port speaks HTTP/1.1 only
    return context


def expires_at(cert_file: Path) -> float:
    """The Unix time the first certificate in ``cert_file`` (the leaf) expires; 0 if it cannot be read now."""
    try:
        return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return 0.0


class ServerTLS:
    """Holds the current server context; ``listener`` is the one to bind the data port with."""

    def __init__(self, tls: TLSConfig) -> None:
        self._built_from = _state(tls)
        self.listener = build(tls)
        self.current = self.listener
        self.listener.sni_callback = self._choose
        self.expires_at = expires_at(tls.cert_file)
        self.on_renewed: Callable[[float], None] | None = None  # told the new certificate's expiry

    def _choose(self, ssl_object: ssl.SSLObject, server_name: str | None, listener: ssl.SSLContext) -> None:
        current = self.current
        if current is not listener:
            ssl_object.context = current
        return None

    def prepare(self, config: Config) -> Callable[[], None]:
        """For ``Reloader``: build the context for ``config`` now (ConfigError if its files cannot be used)."""
        tls = config.tls
        if tls is None or (state := _state(tls)) == self._built_from:
            return lambda: None  # a reload that changed other settings: the files are the same
        fresh = build(tls)
        expiry = expires_at(tls.cert_file)

        def commit() -> None:
            self.current, self._built_from, self.expires_at = fresh, state, expiry
            if self.on_renewed is not None:
                self.on_renewed(expiry)
            log.info(
                "tls: new connections get the certificate from %s",
                tls.cert_file,
                extra={"event": "tls_reloaded", "cert_file": str(tls.cert_file)},
            )

        return commit


def _state(tls: TLSConfig) -> tuple[object, ...]:
    return (tls, *(snapshot(path) for path in tls.files))
