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

Always the Prometheus text format (0.0.4), even when a scraper also accepts OpenMetrics (Prometheus asks for both):
the proxy uses nothing only OpenMetrics can carry (exemplars, native histograms), and one format has one fast writer
(``text_format.py``), ten times quicker than prometheus-client's generic one at 5,000 tenants.

Single flight: scrapes asking for the same thing while a render runs wait for that render instead of starting their
own, so several Prometheus servers (or a scrape retried on timeout) never pile renders onto the thread pool.
"""

from __future__ import annotations

import asyncio
import gzip

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from . import text_format
from .metrics import Metrics

# Level 1: most of gzip's size win for a fraction of the level-9 CPU; the text format compresses ~10x at any level.
GZIP_LEVEL = 1

Key = tuple[bool, tuple[str, ...]]


class MetricsPage:
    """The ``/metrics`` handler for ``metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._renders: dict[Key, asyncio.Future[bytes]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        gzipped = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        names = tuple(sorted(request.query.getall("name[]", [])))  # prometheus-client's ?name[]= filter
        body = await self.render(gzipped=gzipped, names=names)
        headers = {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    async def render(self, *, gzipped: bool = False, names: tuple[str, ...] = ()) -> bytes:
        """The exposition (gzipped if asked), rendered off the event loop; one render for concurrent equal asks."""
        key: Key = (gzipped, names)
        pending = self._renders.get(key)
        if pending is None:
            metrics = self._metrics

            def work() -> bytes:
                if names:  # a few families by name: rare and small, prometheus-client's own writer does
                    output = generate_latest(metrics.exposition.restricted_registry(names))
                else:
                    output = text_format.render(metrics.registry)
                return gzip.compress(output, compresslevel=GZIP_LEVEL) if gzipped else output

            pending = asyncio.ensure_future(asyncio.to_thread(work))
            self._renders[key] = pending
            pending.add_done_callback(lambda _: self._renders.pop(key, None))
        # shield: a scrape that times out and disconnects must not cancel the render the others wait for.
        return await asyncio.shield(pending)
