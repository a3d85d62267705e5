"""Bytes on a socket: requests an HTTP client library would tidy up (dot segments, malformed lines) sent as written."""

from __future__ import annotations

from conftest import raw_exchange


async def get(url: str, target: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    """``GET target`` as written on the request line, one connection, closed after the answer."""
    lines = [f"GET {target} HTTP/1.1", "Host: proxy.test", "Connection: close", *extra, "", ""]
    return await raw_exchange(url, "\r\n".join(lines).encode("latin-1"))
