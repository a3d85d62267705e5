"""The forward-proxy mode: an app whose library hard-codes ``https://api.servicetitan.io`` runs with ``HTTPS_PROXY``
pointing here and trusts the local CA; its requests are served by the data port's own request path.

A connection starts with ``CONNECT host:port`` (RFC 9110 section 9.3.6). The request head is read with a size and
time bound, then the host decides:

- ServiceTitan's public auth and API names (port 443) and the hosts of the configured environments (443 or their
  configured port) are intercepted: ``200 Connection established``, then the same connection is upgraded with
  ``loop.start_tls`` using a certificate for exactly that host, signed by the local CA (``leaves.py``), and handed to
  the data app's HTTP protocol (``web.Server``'s ``RequestHandler``). Tunnelled requests thus take exactly the data
  port's path: clients, routing, limits, injection, the local token endpoint. There is no internal port that a local
  process could reach around this check.
- Any other host: 403 and the connection closed; nothing is resolved or dialled. With ``other_hosts: tunnel`` the
  bytes are relayed untouched instead (never decrypted), so the app's other HTTPS calls keep working.

Anything but ``CONNECT`` is refused, including absolute-form ``GET https://...`` requests that some older clients send
to a proxy: answering them would mean reading the app's credentials in clear text on a plain-HTTP hop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

from aiohttp import web

from ..config import Address, Config, ConfigError, ForwardProxyConfig
from ..config.file_watch import snapshot
from ..http.headers import SERVER
from ..http.problems import ERROR_HEADER, PROBLEM_TYPE
from ..ops.tls_metrics import TLSMetrics
from .certs import CertError, LocalCA, permits
from .leaves import LeafCache
from .tunnel import IDLE_TIMEOUT_SECONDS, TunnelFailed, relay

log = logging.getLogger("st_proxy.forward_proxy")

PUBLIC_HOSTS = (
    "auth.servicetitan.io",
    "api.servicetitan.io",
    "auth-integration.servicetitan.io",
    "api-integration.servicetitan.io",
)
MAX_HEAD_BYTES = 8192  # a CONNECT head is one line and a few headers
HEAD_TIMEOUT_SECONDS = 10.0
HANDSHAKE_TIMEOUT_SECONDS = 10.0
_AUTHORITY = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


def intercepted(config: Config) -> frozenset[tuple[str, int]]:
    """(host, port) pairs whose tunnels the proxy terminates and serves itself."""
    pairs = {(host, 443) for host in PUBLIC_HOSTS}
    for env in config.environments.values():
        for url in (env.auth_url, env.api_url):
            parts = urlsplit(url)
            if parts.hostname:
                pairs.add((parts.hostname.lower(), 443))
                if parts.port:
                    pairs.add((parts.hostname.lower(), parts.port))
    return frozenset(pairs)


def unsignable(config: Config, ca: LocalCA) -> list[str]:
    """Intercepted host names a name-constrained local CA may not sign: CONNECTs to them will be refused.

    A CA made with ``certs init --permit api.servicetitan.io`` alone cannot serve the auth host, where client
    libraries fetch their tokens; saying so at start and in check-config beats a bare 403 at the first CONNECT.
    """
    permitted = ca.permitted
    if permitted is None:
        return []
    hosts = sorted({host for host, _ in intercepted(config)})
    return [host for host in hosts if not permits(_name(host), permitted)]


def _name(host: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host


def _answer(status: int, reason: str, code: str | None = None, detail: str = "") -> bytes:
    if code is None:
        return f"HTTP/1.1 {status} {reason}\r\n\r\n".encode()
    body = json.dumps({"type": f"{PROBLEM_TYPE}{code}", "title": reason, "status": status, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER}\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\n{ERROR_HEADER}: {code}\r\nConnection: close\r\n"
    )
    if status == 405:
        head += "Allow: CONNECT\r\n"
    return head.encode() + b"\r\n" + body


class _Refused(Exception):
    def __init__(self, status: int, reason: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.answer = _answer(status, reason, code, detail)
        self.code = code
        self.detail = detail  # written by the proxy, never the request's bytes: safe for the log line


def parse_head(head: bytes) -> tuple[str, int]:
    """The (host, port) of a ``CONNECT`` head; ``_Refused`` for anything else."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "Bad Request", "invalid_request", "not an HTTP/1.x request line")
    method, target = parts[0], parts[1]
    if method != "CONNECT":
        raise _Refused(
            405,
            "Method Not Allowed",
            "connect_required",
            "this is the forward-proxy port: only CONNECT host:443 is accepted (set HTTPS_PROXY, not HTTP_PROXY, "
            "and use https:// URLs)",
        )
    match = _AUTHORITY.fullmatch(target)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise _Refused(400, "Bad Request", "invalid_request", "CONNECT needs host:port (RFC 9110 section 9.3.6)")
    host = match["host"].lower()
    if host.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise _Refused(400, "Bad Request", "invalid_request", "not a valid IPv6 address") from None
    return host, int(match["port"])


class ForwardProxy:
    """The ``CONNECT`` listener. ``server`` makes the data app's HTTP protocol (``runner.server``)."""

    def __init__(
        self,
        settings: ForwardProxyConfig,
        *,
        config: Callable[[], Config],
        server: Callable[[], asyncio.Protocol],
        leaves: LeafCache | None = None,
        head_timeout: float = HEAD_TIMEOUT_SECONDS,
        tunnel_idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    ) -> None:
        self._settings = settings
        self.head_timeout = head_timeout
        self._tunnel_idle_timeout = tunnel_idle_timeout
        self._config = config
        self._server = server
        self._ca_state = _ca_state(settings)
        self.leaves = leaves or LeafCache(load_ca(settings))
        self._listener: asyncio.Server | None = None
        self._pending: set[asyncio.Transport] = set()  # connections not yet handed to the HTTP protocol or a relay
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: Address | None = None
        self.metrics: TLSMetrics | None = None
        # The intercepted hosts, computed once per config (``_hosts_of``), not on every CONNECT.
        self._hosts_of: Config | None = None
        self._hosts: frozenset[tuple[str, int]] = frozenset()

    async def start(self) -> Address:
        loop = asyncio.get_running_loop()
        listen = self._settings.listen
        self._listener = await loop.create_server(
            lambda: _ConnectHead(self), listen.host, listen.port, reuse_address=True
        )
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.address = Address(host, port)
        return self.address

    async def stop_listening(self) -> None:
        """Refuse new connections; tunnels already handed to the HTTP protocol drain with the data port."""
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None

    async def close(self) -> None:
        await self.stop_listening()
        for transport in list(self._pending):
            transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def prepare(self, config: Config) -> Callable[[], None]:
        """For ``Reloader``: a renewed or replaced CA is loaded now (ConfigError if unusable) and used from the next
        tunnel on; the leaves it signed before are dropped."""
        settings = config.forward_proxy
        if settings is None or _ca_state(settings) == self._ca_state:
            return lambda: setattr(self, "_settings", settings or self._settings)
        state = _ca_state(settings)
        leaves = LeafCache(load_ca(settings))

        def commit() -> None:
            self._settings, self._ca_state, self.leaves = settings, state, leaves
            if self.metrics is not None:
                self.metrics.certificate_expires("forward_proxy_ca", leaves.ca.cert.not_valid_after_utc.timestamp())
            log.info("forward proxy: the local CA was renewed", extra={"event": "forward_proxy_ca_reloaded"})

        return commit

    # -- one connection ----------------------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def dispatch(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        started = time.perf_counter()
        try:
            host, port = parse_head(head)
        except _Refused as bad:
            self._refuse(transport, bad, None, started)
            return
        if (host, port) in self._intercepted():
            if rest:  # the TLS ClientHello must wait for our 200 (RFC 9110 section 9.3.6)
                refused = _Refused(400, "Bad Request", "invalid_request", "data sent before the tunnel was set up")
                self._refuse(transport, refused, f"{host}:{port}", started)
                return
            self._spawn(self._intercept(transport, host, port, started))
        elif self._settings.other_hosts == "tunnel":
            self._spawn(self._tunnel(transport, host, port, rest, started))
        else:
            refused = _Refused(
                403,
                "Forbidden",
                "connect_refused",
                f"{host}:{port} is not a ServiceTitan host this proxy serves (forward_proxy.other_hosts: refuse)",
            )
            self._refuse(transport, refused, f"{host}:{port}", started)

    def _intercepted(self) -> frozenset[tuple[str, int]]:
        config = self._config()
        if config is not self._hosts_of:  # a reload made a new config: its environments may name other hosts
            self._hosts_of, self._hosts = config, intercepted(config)
        return self._hosts

    def _refuse(self, transport: asyncio.Transport, refused: _Refused, target: str | None, started: float) -> None:
        transport.write(refused.answer)
        transport.close()
        self._pending.discard(transport)
        self._log("refused", target, started, error=refused.code, reason=refused.detail)

    async def _intercept(self, transport: asyncio.Transport, host: str, port: int, started: float) -> None:
        target = f"{host}:{port}"
        try:
            context = await self.leaves.context_off_loop(host)  # a new leaf is signed in a worker thread
        except CertError as exc:  # e.g. the CA's --permit does not cover a configured environment's host
            refused = _Refused(403, "Forbidden", "connect_refused", f"the local CA cannot sign {host}: {exc}")
            self._refuse(transport, refused, target, started)
            return
        transport.write(_answer(200, "Connection established"))
        protocol = self._server()
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(
                transport, protocol, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_SECONDS
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # Most often the app does not trust the local CA yet (docs/tls.md says how per runtime).
            transport.abort()
            self._pending.discard(transport)
            self._log("handshake_failed", target, started, error=type(exc).__name__, reason=_reason(exc))
            return
        finally:
            self._pending.discard(transport)
        if tls_transport is None:
            transport.abort()
            return
        protocol.connection_made(tls_transport)
        self._log("intercepted", target, started)

    async def _tunnel(self, transport: asyncio.Transport, host: str, port: int, rest: bytes, started: float) -> None:
        target = f"{host}:{port}"
        try:
            await relay(
                transport,
                host,
                port,
                rest,
                on_open=lambda: self._pending.discard(transport),
                idle_timeout=self._tunnel_idle_timeout,
            )
        except TunnelFailed as failed:
            self._refuse(transport, _Refused(failed.status, failed.reason, failed.code, failed.detail), target, started)
            return
        self._log("tunnelled", target, started)

    def _log(self, outcome: str, target: str | None, started: float, **fields: object) -> None:
        if self.metrics is not None:
            self.metrics.connect(outcome)
        level = logging.INFO if outcome in ("intercepted", "tunnelled") else logging.WARNING
        log.log(
            level,
            "CONNECT %s: %s",
            target or "(malformed)",
            outcome,
            extra={
                "event": "connect",
                "target": target,
                "outcome": outcome,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                **fields,
            },
        )


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or type(exc).__name__


class _ConnectHead(asyncio.Protocol):
    """Reads one request head (bounded in size and time), then hands the connection to ``ForwardProxy.dispatch``."""

    def __init__(self, proxy: ForwardProxy) -> None:
        self._proxy = proxy
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._proxy._pending.add(self._transport)
        self._timer = asyncio.get_running_loop().call_later(self._proxy.head_timeout, self._too_slow)

    def _too_slow(self) -> None:
        if self._transport is not None:
            self._transport.write(_answer(408, "Request Timeout", "invalid_request", "no CONNECT head in time"))
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._finish()
                refused = _Refused(431, "Request Header Fields Too Large", "invalid_request", "head too large")
                self._proxy._refuse(self._transport, refused, None, time.perf_counter())
            return
        self._finish()
        self._transport.pause_reading()
        head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 4 :])
        self._proxy.dispatch(self._transport, head, rest)

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        if self._transport is not None:
            self._proxy._pending.discard(self._transport)


def _ca_state(settings: ForwardProxyConfig) -> tuple[object, ...]:
    return (settings.ca_cert_file, settings.ca_key_file, *(snapshot(p) for p in settings.files))


def load_ca(settings: ForwardProxyConfig) -> LocalCA:
    try:
        return LocalCA.load(settings.ca_cert_file, settings.ca_key_file)
    except CertError as exc:
        raise ConfigError([f"forward_proxy: {exc}"]) from None


async def start_forward_proxy(
    settings: ForwardProxyConfig,
    *,
    config: Callable[[], Config],
    runner: web.BaseRunner,
    leaves: LeafCache | None = None,
) -> ForwardProxy:
    """The listener, handing intercepted tunnels to ``runner``'s HTTP protocol (the data port's)."""
    server = runner.server
    assert server is not None, "start the data runner first"
    proxy = ForwardProxy(settings, config=config, server=server, leaves=leaves)
    await proxy.start()
    return proxy
