"""What the hot-path work changed, held to the behaviour before it (docs/performance.md).

The access line is built without ``logging`` and written in batches: the same text as the formatters wrote, in the
same order as other records, nothing lost at a flush or a failing stream. Metric children are cached per label set:
a tenant removed on reload stops getting its own series. Relayed answers wait for their first body bytes to go out
with the headers, but never hold the status line back while the body is slow. The event loop is uvloop unless
``ST_PROXY_LOOP=asyncio``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import pytest
from aiohttp import web
from conftest import T1, T2, sim_config
from prometheus_client import CollectorRegistry

from st_proxy.ops import log as logsetup
from st_proxy.ops.metrics import Metrics
from st_proxy.server.serve import LOOP_VARIABLE, loop_factory

FIELDS = {
    "request_id": "rid-1",
    "tenant": "1000001",
    "method": "GET",
    "path": '/crm/v2/tenant/1000001/a b"c',
    "status": 200,
    "duration_ms": 1.25,
    "upstream_ms": None,
    "bytes": 300,
    "client": "billing",
}


@pytest.fixture
def restore_logging():
    yield
    logsetup.flush()
    logging.getLogger("st_proxy").handlers.clear()


def formatted_by_logging(fmt: str) -> str:
    """The line the logging formatters write for the same fields (the way every access line was written before)."""
    record = logging.getLogger(logsetup.ACCESS_LOGGER).makeRecord(
        logsetup.ACCESS_LOGGER, logging.INFO, __file__, 1, "request", (), None, extra=dict(FIELDS)
    )
    formatter = logsetup.JsonFormatter() if fmt == "json" else logsetup.TextFormatter()
    return formatter.format(record)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_access_line_is_the_text_the_formatter_wrote_with_the_time_in_the_same_form(fmt, restore_logging):
    stream = io.StringIO()
    logsetup.setup(fmt, "info", stream)
    logsetup.access(**FIELDS)
    logsetup.flush()
    written, expected = stream.getvalue().rstrip("\n"), formatted_by_logging(fmt)
    if fmt == "json":
        got, want = json.loads(written), json.loads(expected)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got.pop("time"))
        want.pop("time")
        assert list(got.items()) == list(want.items())  # same members, same order
    else:
        stamp = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ")
        assert stamp.match(written) and stamp.sub("", written) == stamp.sub("", expected)
    assert written.count("\n") == 0


async def test_buffered_access_lines_are_written_before_any_later_record_and_on_flush(restore_logging):
    stream = io.StringIO()
    logsetup.setup("json", "info", stream)
    logsetup.access(**FIELDS, sequence=1)
    logging.getLogger("st_proxy.server").info("after the first request", extra={"event": "marker"})
    logsetup.access(**FIELDS, sequence=2)
    for handler in logging.getLogger("st_proxy").handlers:
        handler.flush()  # what logging.shutdown() does at exit, and serve.py before os._exit
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r.get("sequence", r.get("event")) for r in records] == [1, "marker", 2]


async def test_buffered_access_lines_reach_the_stream_without_anyone_flushing(restore_logging):
    stream = io.StringIO()
    logsetup.setup("json", "info", stream)
    logsetup.access(**FIELDS)
    for _ in range(200):  # bounded: FLUSH_SECONDS is 0.05 s
        if stream.getvalue():
            break
        await asyncio.sleep(0.05)
    assert json.loads(stream.getvalue())["request_id"] == "rid-1"


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("stdout is gone")


def test_a_stream_that_fails_costs_the_lines_it_could_not_take_and_says_so_once(restore_logging, capsys):
    logsetup.setup("json", "info", BrokenStream())
    logsetup.access(**FIELDS)  # outside an event loop: written at once
    logsetup.access(**FIELDS)
    sink = logsetup._access_log
    assert sink is not None and sink.failed_lines == 2
    assert capsys.readouterr().err.count("could not write") == 1


def test_access_lines_go_through_logging_when_the_proxy_did_not_set_it_up(restore_logging, caplog):
    logging.getLogger("st_proxy").handlers.clear()
    logging.getLogger("st_proxy").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger=logsetup.ACCESS_LOGGER):
            logsetup.access(**FIELDS)
    finally:
        logging.getLogger("st_proxy").propagate = False
    [record] = [r for r in caplog.records if r.name == logsetup.ACCESS_LOGGER]
    assert record.request_id == "rid-1"  # type: ignore[attr-defined]


def test_a_removed_tenant_stops_getting_its_own_request_series():
    metrics = Metrics(CollectorRegistry())
    metrics.set_tenants([T1.tenant_id, T2.tenant_id])
    metrics.request_done(T2.tenant_id, "GET", 200, 0.01)
    metrics.request_done(T2.tenant_id, "GET", 200, 0.01)
    value = metrics.registry.get_sample_value
    assert value("st_proxy_requests_total", {"tenant": T2.tenant_id, "method": "GET", "code": "200"}) == 2
    metrics.set_tenants([T1.tenant_id])
    metrics.request_done(T2.tenant_id, "GET", 200, 0.01)
    assert value("st_proxy_requests_total", {"tenant": T2.tenant_id, "method": "GET", "code": "200"}) is None
    assert value("st_proxy_requests_total", {"tenant": "none", "method": "GET", "code": "200"}) == 1
    metrics.set_tenants([T1.tenant_id, T2.tenant_id])  # added back: a fresh series, counted from zero
    metrics.request_done(T2.tenant_id, "GET", 200, 0.01)
    assert value("st_proxy_requests_total", {"tenant": T2.tenant_id, "method": "GET", "code": "200"}) == 1


def test_the_duration_histogram_counts_each_request_in_the_bucket_prometheus_client_would():
    metrics = Metrics(CollectorRegistry())
    metrics.set_tenants([T1.tenant_id])
    reference = Metrics(CollectorRegistry())
    reference.set_tenants([T1.tenant_id])
    for seconds in (0.0, 0.001, 0.0010001, 0.003, 0.5, 1.0, 119.0, 120.0, 1e6):
        metrics.request_done(T1.tenant_id, "GET", 200, seconds)
        reference.request_duration.labels(T1.tenant_id).observe(seconds)  # prometheus-client's own observe
    ours = {(s.name, s.labels.get("le")): s.value for f in metrics.registry.collect() for s in f.samples}
    theirs = {(s.name, s.labels.get("le")): s.value for f in reference.registry.collect() for s in f.samples}
    keys = [k for k in theirs if k[0].startswith("st_proxy_request_duration_seconds_") and "created" not in k[0]]
    assert len(keys) > 10 and all(ours[k] == theirs[k] for k in keys)


def test_the_loop_is_uvloop_unless_asyncio_is_asked_for():
    uvloop = pytest.importorskip("uvloop")  # a dependency on Linux, where the suite runs
    assert loop_factory({}) is uvloop.new_event_loop
    assert loop_factory({LOOP_VARIABLE: "asyncio"}) is None
    assert loop_factory({LOOP_VARIABLE: " AsyncIO "}) is None


async def test_the_status_line_is_not_held_back_while_the_upstream_holds_the_body(
    simulator, fake_upstream, start_proxy
):
    release = asyncio.Event()

    async def slow_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"X-Upstream": "yes"})
        await response.prepare(request)  # the status line and headers now, the body only when released
        await release.wait()
        await response.write(b"the body")
        await response.write_eof()
        return response

    proxy = await start_proxy(sim_config(simulator, api_url=await fake_upstream(slow_body)))
    async with asyncio.timeout(20):  # a proxy that held the headers back for the body would never get past this
        async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/export") as resp:
            assert resp.status == 200 and resp.headers["X-Upstream"] == "yes"
            release.set()
            assert await resp.read() == b"the body"


async def test_a_small_answer_arrives_whole_with_its_headers(simulator, fake_upstream, start_proxy):
    async def small(request: web.Request) -> web.Response:
        return web.json_response({"data": "x" * 300}, headers={"X-Upstream": "yes"})

    proxy = await start_proxy(sim_config(simulator, api_url=await fake_upstream(small)))
    reader, writer = await asyncio.open_connection(*proxy.url.removeprefix("http://").rsplit(":", 1))
    try:
        writer.write(f"GET /crm/v2/tenant/{T1.tenant_id}/x HTTP/1.1\r\nHost: p\r\n\r\n".encode())
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            body = await reader.readexactly(length)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and b"X-Upstream: yes" in head
    assert json.loads(body) == {"data": "x" * 300}


async def test_made_up_request_ids_are_distinct_32_hex_digit_ids(simulator, start_proxy):
    proxy = await start_proxy(sim_config(simulator))
    ids = []
    for _ in range(3):
        async with proxy.session.get(f"{proxy.url}/crm/v2/tenant/{T1.tenant_id}/customers") as resp:
            ids.append(resp.headers["X-Request-ID"])
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
