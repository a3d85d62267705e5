"""Bytes on a socket: requests an HTTP client library would tidy up (dot segments, malformed lines) sent as written."""

from __future__ import annotations

import asyncio

from yarl import URL

DEADLINE = 10.0  # seconds: a bound on a loopback exchange, never a timing assertion


async def exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` exactly as written and read until the server closes: (status, lower-cased headers, body)."""
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def get(url: str, target: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    """``GET target`` as written on the request line, one connection, closed after the answer."""
    lines = [f"GET {target} HTTP/1.1", "Host: proxy.test", "Connection: close", *extra, "", ""]
    return await exchange(url, "\r\n".join(lines).encode("latin-1"))
