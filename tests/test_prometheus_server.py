"""A real Prometheus server (Debian's `prometheus` package) scrapes the proxy's admin port on loopback.

Missing binary: the tests fail with a clear message, unless ST_PROXY_ALLOW_NO_PROMETHEUS=1 turns that into a skip.
Every wait polls Prometheus' HTTP API with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from test_deploy_observability import (
    ALERTS,
    alert_rules,
    as_plain_promql,
    dashboard_exprs,
    prometheus_binary,
)
from test_metrics import (  # noqa: F401 (fixtures)
    OK,
    REJECTED,
    TENANTS,
    TTL,
    api,
    broken_upstreams,
    mixed,
    settled,
)

DEADLINE = 60.0  # seconds; Prometheus starts in one or two and scrapes every second


class Prometheus:
    def __init__(self, url: str, proc: asyncio.subprocess.Process, log: Path, session: aiohttp.ClientSession):
        self.url, self.proc, self.log, self.session = url, proc, log, session

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    async def api(self, path: str, **params: str) -> Any:
        async with self.session.get(self.url + path, params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        return (await self.api("/api/v1/query", query=promql))["result"]

    async def wait_for(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Poll ``check`` until it holds; fail after DEADLINE seconds, showing Prometheus' own log."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if await check():
                    return
            except (aiohttp.ClientError, AssertionError):
                pass  # not listening yet, or the answer is not there yet
            await asyncio.sleep(0.2)
        pytest.fail(f"gave up after {DEADLINE:.0f}s waiting for {what}; prometheus log:\n{self.tail()}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def prometheus(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Prometheus]]]:
    binary = prometheus_binary("prometheus")
    started: list[Prometheus] = []
    session = aiohttp.ClientSession()

    async def start(target: str, **job: Any) -> Prometheus:
        """Prometheus scraping ``target`` (host:port of the admin port) every second, with our alert rules.
        ``job``: more settings of the scrape job (``authorization``)."""
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "st-proxy", "static_configs": [{"targets": [target]}], **job}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdout=out,
                stderr=out,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", proc, log, session)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.returncode is None:
            server.proc.terminate()
            try:
                await asyncio.wait_for(server.proc.wait(), timeout=20)
            except TimeoutError:
                server.proc.kill()
                await server.proc.wait()
    await session.close()


async def _send(proxy, path: str, times: int) -> list[int]:
    statuses = []
    for _ in range(times):
        async with proxy.session.get(proxy.url + path) as resp:
            await resp.read()
            statuses.append(resp.status)
    return statuses


def _target(proxy) -> str:
    return proxy.admin_url.removeprefix("http://")


async def test_a_real_prometheus_scraping_the_admin_port_counts_every_request_sent(mixed, prometheus):
    sim, proxy = mixed
    sent = {OK: 7, REJECTED: 2, "none": 3}
    assert await _send(proxy, api(OK), sent[OK]) == [200] * sent[OK]
    assert await _send(proxy, api(REJECTED), sent[REJECTED]) == [502] * sent[REJECTED]
    assert await _send(proxy, api("999"), sent["none"]) == [403] * sent["none"]
    await settled(proxy)
    prom = await prometheus(_target(proxy))

    async def total_arrived() -> bool:
        result = await prom.query("sum(st_proxy_requests_total)")
        return bool(result) and float(result[0]["value"][1]) == sum(sent.values())

    await prom.wait_for("sum(st_proxy_requests_total) to equal the requests sent", total_arrived)
    by_tenant = {
        r["metric"]["tenant"]: float(r["value"][1])
        for r in await prom.query("sum by (tenant) (st_proxy_requests_total)")
    }
    assert by_tenant == sent
    [up] = await prom.query('up{job="st-proxy"}')
    assert up["value"][1] == "1" and up["metric"]["instance"] == _target(proxy)
    # The scrape-time expiry gauge as Prometheus stored it: the proxy's clock has not moved since the prewarm.
    expiry = {
        r["metric"]["tenant"]: float(r["value"][1]) for r in await prom.query("st_proxy_token_expires_in_seconds")
    }
    assert expiry == {t: (0 if t == REJECTED else TTL) for t in TENANTS}  # the rejected tenant has none


async def test_a_real_prometheus_evaluates_every_alert_rule_and_flags_the_rejected_tenant(mixed, prometheus):
    _, proxy = mixed
    await _send(proxy, api(OK), 2)
    await settled(proxy)
    prom = await prometheus(_target(proxy))
    names = {r["alert"] for r in alert_rules()}

    async def all_rules_evaluated() -> bool:
        groups = (await prom.api("/api/v1/rules"))["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert {r["name"] for r in rules} == names
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        return all(not r["lastEvaluation"].startswith("0001") for r in rules) and await prom.query("up") != []

    await prom.wait_for("every rule to be evaluated once", all_rules_evaluated)

    async def rejected_tenant_flagged() -> bool:
        alerts = (await prom.api("/api/v1/alerts"))["alerts"]
        return any(
            a["labels"]["alertname"] == "STProxyTenantCredentialsRejected" and a["labels"]["tenant"] == REJECTED
            for a in alerts
        )

    await prom.wait_for("the credentials alert for the rejected tenant", rejected_tenant_flagged)
    alerts = (await prom.api("/api/v1/alerts"))["alerts"]
    flagged = {(a["labels"]["alertname"], a["labels"].get("tenant")) for a in alerts}
    assert ("STProxyTenantCredentialsRejected", REJECTED) in flagged
    assert ("STProxyTenantCredentialsRejected", OK) not in flagged
    assert "STProxyDown" not in {name for name, _ in flagged}
    for alert in alerts:  # the annotation templates render (a broken one shows "error expanding template")
        for text in alert["annotations"].values():
            assert "error" not in text.lower() or "expanding" not in text.lower(), text
        assert REJECTED in alert["annotations"]["summary"]
    # Every dashboard query runs on a real server, with Grafana's variables filled in.
    for expr in dashboard_exprs():
        await prom.query(as_plain_promql(expr))
