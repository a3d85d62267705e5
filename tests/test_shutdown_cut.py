"""Requests cut off by the shutdown are logged and counted as such (503, error ``shutdown``), never as callers that
hung up (499 ``caller_disconnected``). Against the real `st-proxy serve` process, with a request that outlasts
``shutdown.timeout_seconds``."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from held_upstream import DEADLINE, PATH, access_line, held, serve_held  # noqa: F401 (fixtures)


@pytest.mark.parametrize("streaming", [False, True], ids=["waiting-for-upstream", "mid-stream"])
async def test_a_request_cut_by_the_shutdown_is_logged_as_shutdown_not_as_a_caller_hanging_up(
    held, serve_held, streaming
):
    upstream, _ = held
    upstream.first_chunk = streaming
    child = await serve_held(shutdown={"drain_seconds": 0, "timeout_seconds": 0.5})
    async with aiohttp.ClientSession() as caller:
        call = asyncio.create_task(caller.get(child.url + PATH))
        await asyncio.wait_for(upstream.arrived.wait(), DEADLINE)
        child.send(signal.SIGTERM)  # the upstream never answers in full: the request outlasts timeout_seconds
        with pytest.raises(aiohttp.ClientError):
            async with await call as resp:
                await resp.read()
    assert await child.wait_exit() == 0
    line = await access_line(child)
    assert (line["status"], line["error"]) == (503, "shutdown")
    assert upstream.let_go.is_set()  # and the upstream exchange was closed, not left running
    cut = child.with_event("shutdown_cut")
    assert [e["requests"] for e in cut] == [1]
