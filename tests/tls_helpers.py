"""Certificates made by the real `st-proxy certs` command, and a bare TLS server on loopback to check them against."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from st_proxy.cli import main


def certs(*args: str) -> None:
    """Run `st-proxy certs ...` in-process; fail the test if it does not exit 0."""
    code = main(["certs", *map(str, args)])
    assert code == 0, f"st-proxy certs {' '.join(map(str, args))} exited {code}"


def make_ca(directory: Path, *permit: str) -> Path:
    certs("init", "--out", directory, *[a for p in permit for a in ("--permit", p)])
    return directory


def issue(ca: Path, out: Path, *hosts: str, days: int = 365) -> Path:
    certs("issue", "--ca", ca, "--out", out, "--days", str(days), *[a for h in hosts for a in ("--host", h)])
    return out


def issue_client(ca: Path, out: Path, name: str) -> tuple[Path, Path]:
    certs("issue", "--ca", ca, "--out", out, "--client", name)
    return out / "client.crt", out / "client.key"


def client_context(ca_file: Path, client_pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """What a careful client does: verify the chain and the host name against exactly this CA."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if client_pair:
        context.load_cert_chain(*map(str, client_pair))
    return context


@asynccontextmanager
async def bare_tls_server(cert: Path, key: Path) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 that answers b"ok" to whoever completes a handshake; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        try:
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def handshake(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    """Connect to 127.0.0.1:port, verifying the certificate as ``server_hostname``; the first bytes served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname)
    try:
        return await reader.read(2)
    finally:
        writer.close()


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` in one rename, as cert-manager and kubelet do: a watcher never sees half a file."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(data)
    os.replace(temporary, path)
