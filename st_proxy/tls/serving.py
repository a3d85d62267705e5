"""What TLS adds to a running proxy, for ``server/serve.py``: the data port's context and the forward-proxy listener.

Built before anything is bound, so a certificate that cannot be used, or an egress proxy that points back at the
proxy, stops the start with exit 2 and nothing listening.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from ..config import Config, ConfigError
from ..ops.tls_metrics import TLSMetrics
from ..upstream.egress import loops_into

if TYPE_CHECKING:
    from .forward import ForwardProxy
    from .leaves import LeafCache
    from .server_context import ServerTLS

# forward.py, leaves.py and server_context.py load the cryptography package (several MiB of RSS): imported below only
# when `tls` or `forward_proxy` is configured.

log = logging.getLogger("st_proxy.tls")


class TLSListeners:
    def __init__(self, config: Config, environ: Mapping[str, str]) -> None:
        listeners = {"listen": config.listen, "admin_listen": config.admin_listen}
        if config.forward_proxy is not None:
            listeners["forward_proxy.listen"] = config.forward_proxy.listen
        problems = loops_into(environ, listeners)
        if problems:
            raise ConfigError(problems)
        self._config = config
        self.server_tls: ServerTLS | None = None
        if config.tls is not None:
            from .server_context import ServerTLS

            self.server_tls = ServerTLS(config.tls)
        self.forward: ForwardProxy | None = None
        self._leaves: LeafCache | None = None
        if config.forward_proxy is not None:
            from .forward import load_ca
            from .leaves import LeafCache

            self._leaves = LeafCache(load_ca(config.forward_proxy))

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self.server_tls.listener if self.server_tls else None

    async def start(
        self, config: Callable[[], Config], runner: web.BaseRunner, *, registry: CollectorRegistry | None = None
    ) -> None:
        settings = self._config.forward_proxy
        if settings is not None:
            from .forward import start_forward_proxy, unsignable

            self.forward = await start_forward_proxy(settings, config=config, runner=runner, leaves=self._leaves)
            outside = unsignable(config(), self.forward.leaves.ca)
            if outside:
                log.warning(
                    "the forward proxy's CA may not sign %s: CONNECTs to them will be refused (certs init --permit)",
                    ", ".join(outside),
                    extra={"event": "forward_proxy_ca_too_narrow", "hosts": outside},
                )
        if registry is not None and (self.server_tls is not None or self.forward is not None):
            metrics = TLSMetrics(registry, forward_proxy=self.forward is not None)
            if self.server_tls is not None:
                metrics.certificate_expires("data_port", self.server_tls.expires_at)
                self.server_tls.on_renewed = lambda expiry: metrics.certificate_expires("data_port", expiry)
            if self.forward is not None:
                self.forward.metrics = metrics
                ca = self.forward.leaves.ca.cert
                metrics.certificate_expires("forward_proxy_ca", ca.not_valid_after_utc.timestamp())

    @property
    def preparers(self) -> list[Callable[[Config], Callable[[], None]]]:
        found: list[Callable[[Config], Callable[[], None]]] = []
        if self.server_tls is not None:
            found.append(self.server_tls.prepare)
        if self.forward is not None:
            found.append(self.forward.prepare)
        return found

    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"tls": self.server_tls is not None}
        if self.forward is not None:
            fields["forward_proxy_listen"] = str(self.forward.address)
        return fields

    async def stop_listening(self) -> None:
        if self.forward is not None:
            await self.forward.stop_listening()

    async def close(self) -> None:
        if self.forward is not None:
            await self.forward.close()
