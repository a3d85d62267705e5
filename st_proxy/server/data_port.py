"""The data port's serving layer: aiohttp's low-level ``web.Server`` calling ``DataHandler.handle`` directly.

Chosen by measurement over serving the ``web.Application`` through its router (docs/serving-layer.md): the data port
has one handler for every method and target, so the router's lookup, the middleware chain and the per-request
``web.Request`` bought nothing and cost CPU on every request. CONNECT and ``*`` targets, which the router cannot
match, reach the handler like any other request.

The ``web.Application`` from ``create_app`` still owns everything but the routing: its cleanup context opens the client
sessions on start-up and closes them at clean-up, ``app[RUNTIME]`` holds the shared state, and its
``on_response_prepare`` signal still runs for every answer (``DataRequest``). It can also still be served through its
router (aiohttp's test server does that for ``aiohttp_server(create_app(...))``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from .app import DATA_HANDLER


async def expect_continue(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` with ``100 Continue`` before the handler reads the body (RFC 9110 section
    10.1.1), as the Application's router does for every route (aiohttp's default expect handler); other expectations
    get its 417. Without this a client that waits for the 100 (aiohttp's does) never sends its body."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == HttpVersion11:
        if expect.lower() != "100-continue":
            raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the answer's size


class DataRequest(web.BaseRequest):
    """A low-level request that runs its app's ``on_response_prepare`` signal when a response is prepared.

    aiohttp's own ``web.Request`` sends the signal from the same hook (``BaseRequest._prepare_hook``, aiohttp 3.x);
    the low-level ``web.BaseRequest`` leaves the hook empty. ``serve`` relies on it to send ``Connection: close``
    while draining (tests/test_drain.py checks the header against the real process).
    """

    __slots__ = ("_data_app",)

    def __init__(self, app: web.Application, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._data_app = app

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        if signal := self._data_app.on_response_prepare:
            await signal.send(self, response)  # type: ignore[arg-type]


class DataRunner(web.BaseRunner):
    """``web.AppRunner``'s life cycle for the data app, serving through ``web.Server``.

    ``setup`` runs the app's start-up (client sessions, token manager, prewarm), then builds the server;
    ``cleanup`` stops the sites, lets in-flight requests finish (up to ``shutdown_timeout``) and only then runs the
    app's clean-up, so no request loses its client session. Keyword arguments go to ``web.Server`` (and on to
    aiohttp's ``RequestHandler``), as ``web.AppRunner`` passes them.
    """

    __slots__ = ("_app",)

    def __init__(self, app: web.Application, *, handle_signals: bool = False, **kwargs: Any) -> None:
        # auto_decompress=False, as create_app's handler_args: a gzip request body passes untouched, never inflated.
        kwargs.setdefault("auto_decompress", False)
        super().__init__(handle_signals=handle_signals, **kwargs)
        self._app = app

    @property
    def app(self) -> web.Application:
        return self._app

    async def _make_server(self) -> web.Server:
        app, loop = self._app, asyncio.get_running_loop()
        app.freeze()  # signals must be frozen before they are sent
        await app.startup()

        def make_request(message, payload, protocol, writer, task) -> DataRequest:
            return DataRequest(app, message, payload, protocol, writer, task, loop)

        handle = app[DATA_HANDLER].handle

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            if request.headers.get(hdrs.EXPECT):  # as the router: an empty value expects nothing
                await expect_continue(request)
            return await handle(request)  # type: ignore[arg-type]

        return web.Server(handler, request_factory=make_request, **self._kwargs)

    async def shutdown(self) -> None:
        await self._app.shutdown()

    async def _cleanup_server(self) -> None:
        await self._app.cleanup()
