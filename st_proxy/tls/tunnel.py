"""``forward_proxy.other_hosts: tunnel``: bytes relayed untouched between the app and a host the proxy does not serve.

Never decrypted, never logged beyond host and port. Bounded: the dial has a timeout, a tunnel with no bytes in either
direction for ``IDLE_TIMEOUT_SECONDS`` is closed, and flow control keeps at most a transport's write buffer (asyncio's
64 KiB high-water mark) in memory per direction: a side that cannot keep up pauses reading from the other.
"""

from __future__ import annotations

import asyncio
from typing import cast

CONNECT_TIMEOUT_SECONDS = 10.0
IDLE_TIMEOUT_SECONDS = 300.0


class TunnelFailed(Exception):
    def __init__(self, status: int, reason: str, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.code, self.detail = status, reason, code, detail


class _Tunnel:
    def __init__(self, idle_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.last = self.loop.time()
        self.idle_timeout = idle_timeout
        self.halves: list[_Half] = []
        self._timer = self.loop.call_later(idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        idle_until = self.last + self.idle_timeout
        if self.loop.time() >= idle_until:
            self.close()
        else:
            self._timer = self.loop.call_at(idle_until, self._check_idle)

    def close(self) -> None:
        self._timer.cancel()
        for half in self.halves:
            if half.transport is not None:
                half.transport.close()
        if not self.done.done():
            self.done.set_result(None)


class _Half(asyncio.Protocol):
    """One side's protocol: what it receives goes to the other side."""

    def __init__(self, tunnel: _Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.early = bytearray()  # received before the other side was linked (a server that speaks first)
        self.eof = False
        tunnel.halves.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio.Transport
        self.transport = transport

    def link(self, peer: _Half) -> None:
        self.peer = peer
        if self.early and peer.transport is not None:
            peer.transport.write(bytes(self.early))
            self.early.clear()

    def data_received(self, data: bytes) -> None:
        self.tunnel.last = self.tunnel.loop.time()
        if self.peer is None or self.peer.transport is None:
            self.early += data
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.eof or not peer.transport.can_write_eof():
            self.tunnel.close()
            return False
        peer.transport.write_eof()  # half-close: the other direction may still be sending (RFC 9293 section 3.6)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def relay(
    client: asyncio.Transport,
    host: str,
    port: int,
    early: bytes,
    *,
    on_open,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
) -> None:
    """Dial ``host:port``, answer the client's CONNECT with 200 and relay until either side closes or goes idle."""
    loop = asyncio.get_running_loop()
    tunnel = _Tunnel(idle_timeout)
    try:
        upstream, up = await asyncio.wait_for(
            loop.create_connection(lambda: _Half(tunnel), host, port), connect_timeout
        )
    except TimeoutError:
        tunnel.close()
        raise TunnelFailed(
            504, "Gateway Timeout", "upstream_timeout", f"{host}:{port} did not answer in time"
        ) from None
    except OSError:
        tunnel.close()
        raise TunnelFailed(502, "Bad Gateway", "upstream_unreachable", f"{host}:{port} cannot be reached") from None
    client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    down = _Half(tunnel)
    client.set_protocol(down)
    down.connection_made(client)
    down.link(up)
    up.link(down)
    on_open()
    if early:
        upstream.write(early)
    client.resume_reading()
    try:
        await tunnel.done
    finally:
        tunnel.close()  # also when the proxy stops and cancels this task: both connections close with it
