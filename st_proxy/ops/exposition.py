"""``/metrics``: rendered in a worker thread, one render shared by concurrent scrapes (docs/scaling.md).

Rendering is pure Python work proportional to the series count: with thousands of tenants a few hundred milliseconds
(seconds with ``metrics.tenant_histograms`` on). Done on the event loop, as prometheus-client's aiohttp handler does,
it stalls every request on the data port for that long, since both ports share one loop. In a thread the loop keeps
running: the interpreter hands the GIL back and forth every few milliseconds (``sys.getswitchinterval``), so a
request waits at most a few switch intervals, not a whole render. Compression happens in the same thread.

Why a thread rather than a cache or an incremental render: a cache still renders on some scrape and serves stale
counters; an incremental render (yielding to the loop every N series) needs a renderer of our own instead of
prometheus-client's. The thread keeps the library's text format and always serves current values.

prometheus-client's locks are safe to share with the request path: each value has its own ``threading.Lock`` held for
one read or one increment, and a labelled metric's lock is held only to copy its children (``MetricWrapperBase``
``_multi_samples``), never across the whole render; so the request path can wait on a lock for at most a moment, and
the render never holds one lock while taking another the request path holds.

Single flight: scrapes asking for the same thing while a render runs wait for that render instead of starting their
own, so several Prometheus servers (or a scrape retried on timeout) never pile renders onto the thread pool.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterable
from typing import Protocol

from aiohttp import web
from prometheus_client.exposition import choose_encoder

# Level 1: most of gzip's size win for a fraction of the level-9 CPU; the text format compresses ~10x at any level.
GZIP_LEVEL = 1


class Exposable(Protocol):
    def collect(self) -> Iterable[object]: ...

    def restricted_registry(self, names: Iterable[str]) -> Exposable: ...


Key = tuple[str, bool, tuple[str, ...]]


class MetricsPage:
    """The ``/metrics`` handler for ``source`` (a registry or a view of one)."""

    def __init__(self, source: Exposable) -> None:
        self._source = source
        self._renders: dict[Key, asyncio.Future[tuple[bytes, str]]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        accept = ",".join(request.headers.getall("Accept", []))
        gzipped = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        names = tuple(sorted(request.query.getall("name[]", [])))  # prometheus-client's ?name[]= filter
        body, content_type = await self.render(accept, gzipped=gzipped, names=names)
        headers = {"Content-Type": content_type}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def render(
        self, accept: str = "", *, gzipped: bool = False, names: tuple[str, ...] = ()
    ) -> tuple[bytes, str]:
        """The exposition (gzipped if asked) and its content type, rendered off the event loop."""
        encoder, content_type = choose_encoder(accept)
        key: Key = (content_type, gzipped, names)
        pending = self._renders.get(key)
        if pending is None:
            source = self._source.restricted_registry(names) if names else self._source

            def work() -> tuple[bytes, str]:
                output = encoder(source)  # type: ignore[arg-type]
                return (gzip.compress(output, compresslevel=GZIP_LEVEL) if gzipped else output), content_type

            pending = asyncio.ensure_future(asyncio.to_thread(work))
            self._renders[key] = pending
            pending.add_done_callback(lambda _: self._renders.pop(key, None))
        # shield: a scrape that times out and disconnects must not cancel the render the others wait for.
        return await asyncio.shield(pending)
