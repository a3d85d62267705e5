"""deploy/prometheus and deploy/grafana: rules and configs pass promtool, the dashboard is well formed, and every
metric they name is one the proxy serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import sim_config
from test_metrics import Scrape, scrape_text, settled

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
METRIC_NAME = re.compile(r"\bst_proxy_[a-z_]+")
ALLOW_MISSING = "ST_PROXY_ALLOW_NO_PROMETHEUS"


def prometheus_binary(name: str) -> str:
    """Path of Debian's `prometheus` / `promtool`. Missing: a failure, unless ST_PROXY_ALLOW_NO_PROMETHEUS=1 (a skip).

    CI (.ci/run) installs the package, so these tests are never skipped silently.
    """
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if found:
        return found
    message = (
        f"{name} is not installed: install Debian's `prometheus` package (apt-get install prometheus), "
        f"or set {ALLOW_MISSING}=1 to skip this test"
    )
    if os.environ.get(ALLOW_MISSING) == "1":
        pytest.skip(message)
    pytest.fail(message)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prometheus_binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def as_plain_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Prometheus would receive it."""
    return expr.replace("$__rate_interval", "5m").replace("$tenant", ".*")


def base_name(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


# -- Prometheus rules and configs --------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_alert_rules_pass_their_promtool_unit_tests():
    result = promtool("test", "rules", str(PROMETHEUS_DIR / "tests" / "alerts_test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_example_scrape_config(tmp_path):
    # promtool checks that the admin token file the example names exists: give it one, beside copies of the files.
    for name in ("prometheus.yml", "alerts.yaml"):
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    [job] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer"  # sends security.admin_token
    (tmp_path / job["authorization"]["credentials_file"]).write_text("an-admin-token\n")
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_pod_monitor_sends_the_admin_token_from_a_secret():
    monitor = yaml.safe_load((PROMETHEUS_DIR / "podmonitor.yaml").read_text())
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert set(endpoint["authorization"]["credentials"]) == {"name", "key"}


def test_every_alert_has_a_severity_a_summary_and_a_description_saying_what_to_check():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == {
        "STProxyTenantCredentialsRejected",
        "STProxyTokenExpiringRefreshFailing",
        "STProxyUpstream5xxRateHigh",
        "STProxyUpstreamRateLimited",
        "STProxyUpstreamUnreachable",
        "STProxyRequestsWithoutConfiguredTenant",
        "STProxyDown",
        "STProxyConfigReloadFailing",
        "STProxyClientAuthFailures",
        "STProxyRateLimitedLocally",
        "STProxyUpstreamThrottled",
        "STProxyStateBackendDown",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert "check" in rule["annotations"]["description"].lower(), rule["alert"]


def test_every_alert_is_exercised_by_a_promtool_unit_test():
    tests = yaml.safe_load((PROMETHEUS_DIR / "tests" / "alerts_test.yaml").read_text())["tests"]
    tested = {
        m for t in tests for e in t.get("promql_expr_test", []) for m in re.findall(r'alertname="(\w+)"', e["expr"])
    }
    assert tested == {r["alert"] for r in alert_rules()}


def test_the_down_alert_matches_a_static_job_and_a_podmonitor_job():
    [down] = [r for r in alert_rules() if r["alert"] == "STProxyDown"]
    regex = re.search(r'job=~"([^"]+)"', down["expr"]).group(1)
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    monitor = yaml.safe_load((PROMETHEUS_DIR / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    for job in (scrape["scrape_configs"][0]["job_name"], f"default/{monitor['metadata']['name']}"):
        assert re.fullmatch(regex, job), job


# -- the Grafana dashboard ---------------------------------------------------------------------------------------


def test_the_dashboard_is_importable_json_with_datasource_and_tenant_variables():
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    tenant = variables["tenant"]
    assert tenant["query"]["query"] == "label_values(st_proxy_requests_total, tenant)"
    assert tenant["includeAll"] and tenant["multi"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_the_dashboard_has_the_panels_an_operator_needs():
    exprs = "\n".join(dashboard_exprs())
    needed = {
        "request rate by code": r"sum by \(code\) \(rate\(st_proxy_requests_total",
        "latency quantiles": r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(st_proxy_request_duration_seconds_bucket",
        "token fetches by outcome": r"sum by \(tenant, outcome\) \(increase\(st_proxy_token_fetches_total",
        "time to token expiry": r"st_proxy_token_expires_in_seconds",
        "in-flight requests": r"st_proxy_in_flight_requests",
        "upstream errors by kind": r"sum by \(kind\) \(rate\(st_proxy_upstream_errors_total",
        "429s": r'st_proxy_requests_total\{[^}]*code="429"',
        "client authentication by result": r"sum by \(client, result\) \(increase\(st_proxy_client_auth_total",
        "local tokens issued": r"sum by \(client\) \(increase\(st_proxy_local_tokens_issued_total",
    }
    missing = [what for what, pattern in needed.items() if not re.search(pattern, exprs)]
    assert not missing
    for expr in dashboard_exprs():
        if "st_proxy_requests_total" in expr and 'tenant="none"' not in expr:
            assert 'tenant=~"$tenant"' in expr, expr  # the tenant variable filters every per-tenant panel


def test_every_dashboard_query_is_valid_promql(tmp_path):
    # promtool has no "check this expression" command; a recording rule per query gets the same parser.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_plain_promql(expr)}
                    for i, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the names they use exist ------------------------------------------------------------------------------------


async def test_every_metric_named_in_the_alerts_and_the_dashboard_is_served_by_the_proxy(simulator, start_proxy):
    # With limits configured: the limits' metrics exist only then, and the alerts and dashboard name them too.
    proxy = await start_proxy(sim_config(simulator, limits={}))
    async with proxy.session.get(proxy.url + "/crm/v2/tenant/1000001/customers") as resp:
        assert resp.status == 200  # requests_total has series once a request was answered
    await settled(proxy)
    served = {base_name(s.name) for s in Scrape(await scrape_text(proxy)).samples}
    alert_names = {m for r in alert_rules() for m in METRIC_NAME.findall(r["expr"])}
    board_names = {m for e in dashboard_exprs() for m in METRIC_NAME.findall(e)}
    board_names |= {m for v in dashboard()["templating"]["list"] for m in METRIC_NAME.findall(json.dumps(v))}
    assert alert_names and board_names
    assert {base_name(n) for n in alert_names} - served == set()
    assert {base_name(n) for n in board_names} - served == set()
    # Everything the proxy serves is on the dashboard.
    assert served - {base_name(n) for n in board_names} == set()


# -- the missing-binary policy -----------------------------------------------------------------------------------


def test_a_missing_prometheus_binary_fails_the_test_unless_skipping_is_asked_for(monkeypatch):
    monkeypatch.delenv(ALLOW_MISSING, raising=False)
    with pytest.raises(pytest.fail.Exception, match="apt-get install prometheus"):
        prometheus_binary("st-proxy-no-such-binary")
    monkeypatch.setenv(ALLOW_MISSING, "1")
    with pytest.raises(pytest.skip.Exception, match="st-proxy-no-such-binary is not installed"):
        prometheus_binary("st-proxy-no-such-binary")
