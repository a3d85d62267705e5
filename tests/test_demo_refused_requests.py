"""`st-proxy demo` logs a request aiohttp's parser refused as one line in the proxy's format, like `serve` does: no
traceback, and none of the request's bytes (a malformed header line could hold a credential)."""

from __future__ import annotations

import asyncio
import re
import signal

from conftest import raw_exchange
from test_demo import EXCHANGE, printed_lines, start_demo

MARKER = "cs1.SECRET-IN-A-BROKEN-HEADER"


async def test_a_malformed_request_to_the_demo_is_one_log_line_without_its_bytes():
    proc = await start_demo()
    try:
        printed = "\n".join(await printed_lines(proc))
        proxy = re.search(r"proxy at (http://\S+),", printed)
        assert proxy, printed
        # A header line without a colon: aiohttp's parser refuses it before the proxy sees a request.
        status, _, _ = await raw_exchange(
            proxy.group(1), f"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization Bearer {MARKER}\r\n\r\n".encode()
        )
        assert status == 400
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(EXCHANGE):
            stdout, stderr = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    output = stdout.decode() + stderr.decode()
    assert proc.returncode == 0, output[-2000:]
    assert "refused a malformed request" in output, output[-2000:]
    assert "BadHttpMessage" in output or "InvalidHeader" in output or "LineTooLong" in output, output[-2000:]
    assert "Traceback" not in output
    assert MARKER not in output
