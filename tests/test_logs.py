"""Logs (docs/operations.md, "Logs"): one JSON access line per request, lifecycle events, text mode, and no secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import T1, T2, sim_config
from test_metrics import scrape_text, settled

from st_proxy.devtools.simulator import DEMO_APP_KEY, SimTenant
from st_proxy.ops import log as logsetup

ACCESS_FIELDS = {
    "time",
    "level",
    "logger",
    "request_id",
    "tenant",
    "method",
    "path",
    "status",
    "duration_ms",
    "upstream_ms",
    "bytes",
}
TENANT_PATH = f"/crm/v2/tenant/{T1.tenant_id}"
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def access_lines(text: str) -> list[dict[str, Any]]:
    return [line for line in lines(text) if line["logger"] == logsetup.ACCESS_LOGGER]


async def call(proxy, path: str, method: str = "GET", **kwargs: Any):
    async with proxy.session.request(method, proxy.url + path, **kwargs) as resp:
        body = await resp.read()
        return resp, body


# -- the access line ---------------------------------------------------------------------------------------------


async def test_a_request_writes_one_json_access_line_with_the_design_fields(simulator, start_proxy, captured_logs):
    proxy = await start_proxy(sim_config(simulator))
    resp, body = await call(proxy, TENANT_PATH + "/customers?page=2&pageSize=3")
    await settled(proxy)
    [line] = access_lines(captured_logs())
    assert set(line) == ACCESS_FIELDS
    assert RFC3339_UTC.match(line["time"])
    assert line["level"] == "info"
    assert line["tenant"] == T1.tenant_id
    assert (line["method"], line["path"], line["status"]) == ("GET", TENANT_PATH + "/customers", 200)
    assert line["bytes"] == len(body)
    assert line["request_id"] == resp.headers["X-Request-ID"]
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= line["upstream_ms"] > 0


async def test_the_path_field_never_carries_the_query_string(simulator, start_proxy, captured_logs):
    proxy = await start_proxy(sim_config(simulator))
    await call(proxy, TENANT_PATH + "/customers?email=someone%40example.com&access_token=abc")
    await call(proxy, "/crm/v2/tenant/999/customers?ssn=123-45-6789")
    await settled(proxy)
    log = captured_logs()
    assert [line["path"] for line in access_lines(log)] == [TENANT_PATH + "/customers", "/crm/v2/tenant/999/customers"]
    for needle in ("someone", "access_token", "123-45-6789", "?"):
        assert needle not in log


async def test_the_callers_request_id_is_kept_forwarded_upstream_returned_and_logged(
    simulator, start_proxy, captured_logs
):
    proxy = await start_proxy(sim_config(simulator))
    resp, body = await call(proxy, TENANT_PATH + "/echo", headers={"X-Request-ID": "caller-id-42"})
    upstream_saw = [v for k, v in json.loads(body)["headers"] if k.lower() == "x-request-id"]
    assert upstream_saw == ["caller-id-42"]
    assert resp.headers["X-Request-ID"] == "caller-id-42"
    await settled(proxy)
    assert access_lines(captured_logs())[0]["request_id"] == "caller-id-42"


async def test_a_request_without_an_id_gets_a_generated_one_forwarded_returned_and_logged(
    simulator, start_proxy, captured_logs
):
    proxy = await start_proxy(sim_config(simulator))
    resp, body = await call(proxy, TENANT_PATH + "/echo")
    generated = resp.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert [v for k, v in json.loads(body)["headers"] if k.lower() == "x-request-id"] == [generated]
    resp2, _ = await call(proxy, TENANT_PATH + "/echo", headers={"X-Request-ID": "x" * 300})  # not a sane id
    assert resp2.headers["X-Request-ID"] != "x" * 300 and re.fullmatch(r"[0-9a-f]{32}", resp2.headers["X-Request-ID"])
    await settled(proxy)
    assert [line["request_id"] for line in access_lines(captured_logs())] == [generated, resp2.headers["X-Request-ID"]]


async def test_proxy_made_errors_log_their_code_and_the_tenant_the_request_named(simulator, start_proxy, captured_logs):
    proxy = await start_proxy(sim_config(simulator))
    cases = [
        ("/crm/v2/tenant/999/customers", {}, 403, "unknown_tenant", "999"),
        ("/anything", {"X-Tenant-ID": "not-digits"}, 400, "invalid_request", None),
        ("/no/tenant/here", {}, 400, "tenant_required", None),
        (
            TENANT_PATH + "/customers",
            {"X-Tenant-ID": T2.tenant_id},
            400,
            "tenant_mismatch",
            None,
        ),  # names two: none, as in the body
    ]
    for path, headers, status, _, _ in cases:
        resp, _ = await call(proxy, path, headers=headers)
        assert resp.status == status
    await settled(proxy)
    logged = access_lines(captured_logs())
    assert [(x["status"], x["error"], x["tenant"]) for x in logged] == [(c[2], c[3], c[4]) for c in cases]
    for line in logged:
        assert set(line) == ACCESS_FIELDS | {"error"}
        assert line["upstream_ms"] is None


async def test_an_upstream_error_logs_the_servicetitan_trace_id_and_no_error_code(
    simulator, start_proxy, captured_logs
):
    proxy = await start_proxy(sim_config(simulator))
    resp, body = await call(proxy, TENANT_PATH + "/customers/99999999")
    assert resp.status == 404
    trace = json.loads(body)["traceId"]
    await settled(proxy)
    [line] = access_lines(captured_logs())
    assert line["trace_id"] == trace and line["status"] == 404
    assert "error" not in line


# -- lifecycle events --------------------------------------------------------------------------------------------


async def test_a_tenant_with_rejected_credentials_logs_one_event_however_many_requests_fail(
    make_simulator, start_proxy, captured_logs
):
    sim = await make_simulator()
    wrong = SimTenant(T1.tenant_id, T1.client_id, "cs-wrong")
    proxy = await start_proxy(sim_config(sim, tenants=(wrong, T2)), prewarm=False)
    for _ in range(3):
        resp, _ = await call(proxy, TENANT_PATH + "/customers")
        assert resp.status == 502
    await settled(proxy)
    events = [line for line in lines(captured_logs()) if "event" in line]
    assert [(e["event"], e["tenant"], e["error"]) for e in events] == [
        ("token_rejected", T1.tenant_id, "invalid_client")
    ]
    assert events[0]["level"] == "warning"


async def test_a_failing_token_endpoint_logs_backing_off_once_and_recovery_once(
    simulator, start_proxy, captured_logs, clock
):
    proxy = await start_proxy(sim_config(simulator), clock=clock, prewarm=False)
    simulator.fail_tokens(503, "maintenance", times=2)
    statuses = []
    for _ in range(2):
        resp, _ = await call(proxy, TENANT_PATH + "/customers")
        statuses.append(resp.status)
        clock.advance(61)  # past any first or second backoff step
    resp, _ = await call(proxy, TENANT_PATH + "/customers")
    statuses.append(resp.status)
    assert statuses == [503, 503, 200]
    await settled(proxy)
    events = [(e["event"], e.get("tenant")) for e in lines(captured_logs()) if "event" in e]
    assert events == [("token_backing_off", T1.tenant_id), ("token_recovered", T1.tenant_id)]


# -- formats -----------------------------------------------------------------------------------------------------


@pytest.fixture
def text_logs():
    stream = io.StringIO()
    logsetup.setup("text", "info", stream)

    def read() -> str:
        logsetup.flush()
        return stream.getvalue()

    yield read
    logging.getLogger("st_proxy").handlers.clear()


async def test_text_format_writes_a_readable_line_per_request(simulator, start_proxy, text_logs):
    proxy = await start_proxy(sim_config(simulator))
    await call(proxy, TENANT_PATH + "/customers?pageSize=1", headers={"X-Request-ID": "rid-1"})
    await call(proxy, "/crm/v2/tenant/999/a%20b%0Afake=line")
    await settled(proxy)
    out = text_logs().splitlines()
    assert re.fullmatch(
        rf"\d\d:\d\d:\d\d\.\d{{3}} info    GET {TENANT_PATH}/customers 200 [\d.]+ms request_id=rid-1 "
        rf"tenant={T1.tenant_id} upstream_ms=[\d.]+ bytes=\d+",
        out[0],
    )
    # A decoded path with a newline or a space is quoted: it cannot forge a second line or a field.
    assert re.match(r'\S+ info +GET "/crm/v2/tenant/999/a b\\nfake=line" 403 ', out[1])
    assert "error=unknown_tenant" in out[1]
    assert len(out) == 2
    assert not any(line.lstrip().startswith("{") for line in out)


def test_the_json_formatter_never_lets_a_field_overwrite_time_level_or_logger():
    record = logging.makeLogRecord(
        {
            "name": "st_proxy.x",
            "levelno": 20,
            "levelname": "INFO",
            "msg": "hi",
            "time": "forged",
            "level": "forged",
            "logger": "forged",
            "tenant": "1",
        }
    )
    line = json.loads(logsetup.JsonFormatter().format(record))
    assert line["level"] == "info" and line["logger"] == "st_proxy.x" and line["time"] != "forged"
    assert line["tenant"] == "1" and line["message"] == "hi"


def test_an_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="json, text"):
        logsetup.setup("xml", "info", io.StringIO())


# -- secrets -----------------------------------------------------------------------------------------------------

SECRET = "cs-QZX7-distinctive-client-secret"
APP_KEY = "ak-QZX7-distinctive-app-key"
CALLER_CREDENTIAL = "Bearer caller-QZX7-credential"


async def test_secrets_tokens_and_caller_credentials_appear_in_no_log_line_and_no_metric(
    make_simulator, start_proxy, captured_logs, clock
):
    tenant = SimTenant("3000001", "cid.distinct", SECRET)
    sim = await make_simulator(tenants=[tenant], app_keys=[APP_KEY])
    proxy = await start_proxy(sim_config(sim, tenants=(tenant,), app_key={"value": APP_KEY}), clock=clock)
    path = f"/crm/v2/tenant/{tenant.tenant_id}"
    headers = {"Authorization": CALLER_CREDENTIAL, "ST-App-Key": "caller-QZX7-app-key"}
    await call(proxy, path + "/customers", headers=headers)
    await call(proxy, path + "/customers/99999999", headers=headers)  # an upstream error with a body
    sim.revoke_tokens()
    await call(proxy, path + "/customers")  # a 401, a new token and a replay
    sim.set_secret(tenant.tenant_id, "cs-rotated-elsewhere")
    clock.advance(10_000)
    resp, body = await call(proxy, path + "/customers")  # the token endpoint now refuses the secret
    assert resp.status == 502
    await settled(proxy)
    assert len(sim.issued_tokens) == 2
    out = captured_logs() + await scrape_text(proxy)
    assert len(access_lines(captured_logs())) == 4
    for needle in (SECRET, APP_KEY, "caller-QZX7", *sim.issued_tokens, *(t.split(".")[2] for t in sim.issued_tokens)):
        assert needle not in out
        assert needle not in body.decode()


# -- the real process: `st-proxy serve` --------------------------------------------------------------------------


async def _serve(tmp_path: Path, sim, *args: str) -> asyncio.subprocess.Process:
    config = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "app_key": {"env": "OBS_TEST_APP_KEY"},  # env references: a literal would add a config warning line
        "environments": {"sim": {"auth_url": sim.auth_url, "api_url": sim.base_url}},
        "tenants": {
            t.tenant_id: {
                "environment": "sim",
                "client_id": t.client_id,
                "client_secret": {"env": f"OBS_TEST_SECRET_{t.tenant_id}"},
            }
            for t in (T1, T2)
        },
        "shutdown": {"drain_seconds": 0, "timeout_seconds": 5},
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ST_")}
    env.update(
        {"OBS_TEST_APP_KEY": DEMO_APP_KEY, **{f"OBS_TEST_SECRET_{t.tenant_id}": t.client_secret for t in (T1, T2)}}
    )
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "st_proxy",
        "serve",
        "--config",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def _read_until(proc: asyncio.subprocess.Process, seen: list[str], predicate) -> str:
    """Read stdout lines into ``seen`` until one matches; bounded by a timeout."""

    async def loop() -> str:
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError("stdout closed; so far:\n" + "".join(seen))
            seen.append(raw.decode())
            if predicate(seen[-1]):
                return seen[-1]

    return await asyncio.wait_for(loop(), timeout=30)


async def _stop(proc: asyncio.subprocess.Process, seen: list[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    seen.append(out.decode())
    return proc.returncode, err.decode()


async def test_serve_writes_json_lifecycle_events_and_access_lines_on_stdout(simulator, tmp_path):
    proc = await _serve(tmp_path, simulator)
    seen: list[str] = []
    try:
        start = json.loads(await _read_until(proc, seen, lambda s: '"event": "start"' in s))
        await _read_until(proc, seen, lambda s: '"event": "ready"' in s)
        async with aiohttp.ClientSession() as session:
            url = f"http://{start['listen']}{TENANT_PATH}/customers"
            async with session.get(url, headers={"X-Request-ID": "from-the-test"}) as resp:
                assert resp.status == 200
            async with session.get(f"http://{start['admin_listen']}/readyz") as resp:
                assert resp.status == 200
        await _read_until(proc, seen, lambda s: "from-the-test" in s)
        # A request aiohttp's parser refuses never reaches the proxy: one warning line, no traceback, and not the
        # offending bytes (a malformed header line could be someone's credential).
        host, port = start["listen"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization Bearer not-a-header-QZX9\r\n\r\n")
        assert (await reader.read(12)).startswith(b"HTTP/1.")
        writer.close()
        await writer.wait_closed()
        bad = json.loads(await _read_until(proc, seen, lambda s: '"bad_request"' in s))
    finally:
        code, err = await _stop(proc, seen)
    assert code == 0, err
    assert (bad["level"], bad["status"], bad["error"]) == ("warning", 400, "BadHttpMessage")
    assert "QZX9" not in "".join(seen) + err and "Traceback" not in err
    records = lines("".join(seen))  # every stdout line is JSON
    events = [r["event"] for r in records if "event" in r]
    assert events[:2] == ["start", "ready"] and events[-1] == "stopped"
    assert start["tenants"] == 2
    [access] = [r for r in records if r["logger"] == logsetup.ACCESS_LOGGER]
    assert access["request_id"] == "from-the-test" and access["status"] == 200


async def test_serve_with_text_format_and_warning_level_prints_only_warnings_as_text(make_simulator, tmp_path):
    sim = await make_simulator()
    sim.set_secret(T2.tenant_id, "cs-changed")  # the proxy's copy of T2's secret is now refused: a warning
    proc = await _serve(tmp_path, sim, "--log-format", "text", "--log-level", "warning")
    seen: list[str] = []
    try:
        await _read_until(proc, seen, lambda s: "rejected" in s)
    finally:
        code, err = await _stop(proc, seen)
    assert code == 0, err
    out = [line for line in "".join(seen).splitlines() if line]
    assert len(out) == 1, out  # no info lines: not start, not ready, not shutdown
    assert re.fullmatch(
        rf"\d\d:\d\d:\d\d\.\d{{3}} warning tenant {T2.tenant_id}: token endpoint rejected the "
        rf"credentials \(invalid_client\).* tenant={T2.tenant_id} error=invalid_client",
        out[0],
    )
