"""The `limits` and `state` sections and a tenant's own rate_per_second: defaults, every way to get them wrong (each
by its path), a Redis URL's userinfo never shown, and what a reload may change."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import sim_config
from test_config import ENVIRON, MINIMAL, load, problems, write

from st_proxy.config.limits import LimitsConfig, StateConfig, redact_url
from st_proxy.server.reload import FIXED_AT_START

REDIS_PASSWORD = "redis-PASSWORD-do-not-print-5e6f"


def test_without_a_limits_section_nothing_is_paced_and_state_is_in_process(tmp_path):
    config = load(tmp_path, MINIMAL)
    assert config.limits is None
    assert config.state == StateConfig()
    assert config.tenants["1234567"].rate_per_second is None


def test_an_empty_limits_section_turns_pacing_on_with_the_defaults(tmp_path):
    config = load(tmp_path, MINIMAL + "limits: {}\n")
    assert config.limits == LimitsConfig(
        rate_per_second=50,
        burst=10,
        max_wait_seconds=5,
        max_concurrent_per_tenant=20,
        reports_per_minute=1,
        retry_throttled=True,
    )


def test_every_limit_and_the_tenant_override_are_read(tmp_path):
    config = load(
        tmp_path,
        """
        app_key: {env: ST_APP_KEY}
        tenants:
          1234567: {client_id: cid.a, client_secret: {env: ST_CS}, rate_per_second: 12.5}
          7: {client_id: cid.b, client_secret: {env: ST_CS}}
        limits:
          rate_per_second: null
          burst: 3
          max_wait_seconds: 0
          max_concurrent_per_tenant: null
          reports_per_minute: 5
          retry_throttled: false
        """,
    )
    assert config.limits == LimitsConfig(None, 3, 0, None, 5, False)
    assert config.tenants["1234567"].rate_per_second == 12.5
    assert config.tenants["7"].rate_per_second is None


def test_each_bad_limit_is_reported_by_its_path(tmp_path):
    found = problems(
        tmp_path,
        """
        app_key: {env: ST_APP_KEY}
        tenants:
          1234567: {client_id: cid.a, client_secret: {env: ST_CS}, rate_per_second: 0}
          7: {client_id: cid.b, client_secret: {env: ST_CS}, rate_per_second: null}
        limits:
          rate_per_second: -1
          burst: 0.5
          max_wait_seconds: "5"
          max_concurrent_per_tenant: 0
          reports_per_minute: 0
          retry_throttled: "yes"
          rate: 5
        """,
    )
    assert sorted(found) == sorted(
        [
            "tenants.1234567.rate_per_second: expected a number > 0",
            "tenants.7.rate_per_second: expected a number > 0",
            "limits.rate_per_second: expected a number > 0 or null",
            "limits.burst: expected a whole number >= 1",
            "limits.max_wait_seconds: expected a number >= 0",
            "limits.max_concurrent_per_tenant: expected a whole number >= 1 or null",
            "limits.reports_per_minute: expected a number > 0 or null",
            "limits.retry_throttled: expected true or false, got a string",
            "limits.rate: unknown key (expected one of: rate_per_second, burst, max_wait_seconds, "
            "max_concurrent_per_tenant, reports_per_minute, retry_throttled)",
        ]
    )


def test_limits_must_be_a_mapping(tmp_path):
    assert problems(tmp_path, MINIMAL + "limits: [1]\n") == ["limits: expected a mapping, got a list"]


def test_a_redis_state_section_is_read_with_its_password_from_a_secret_reference(tmp_path):
    (tmp_path / "redis_password").write_text(REDIS_PASSWORD + "\n")
    (tmp_path / "ca.pem").write_text("not checked here")
    config = load(
        tmp_path,
        MINIMAL
        + """
state:
  redis_url: rediss://redis.internal:6380/2
  password: {file: redis_password}
  ca_file: ca.pem
  key_prefix: "prod:"
  timeout_ms: 50
  fallback_rate_fraction: 0.25
""",
    )
    state = config.state
    assert state.redis_url == "rediss://redis.internal:6380/2"
    assert state.password is not None and state.password.reveal() == REDIS_PASSWORD
    assert state.ca_file == str(tmp_path / "ca.pem")
    assert (state.key_prefix, state.timeout_ms, state.fallback_rate_fraction) == ("prod:", 50, 0.25)
    assert tmp_path / "redis_password" in config.secret_files  # watched: a rotated password is noticed
    assert REDIS_PASSWORD not in repr(config) + state.describe()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://redis:6379", "expected a redis:// or rediss:// URL with a host, got http://redis:6379"),
        ("redis://", "expected a redis:// or rediss:// URL with a host, got redis://"),
        ("redis://redis:6379/db1", "the path must be a database number (/0), got redis://redis:6379/db1"),
        ("redis://redis:99999", "not a valid URL: redis://redis:99999"),
        ("redis://redis:6379/0?password=x", "must not carry a query or fragment"),
        (5, "expected a redis:// or rediss:// URL or null, got a number"),
    ],
)
def test_a_bad_redis_url_is_reported(tmp_path, value, message):
    text = (
        MINIMAL + f"state: {{redis_url: {value!r}}}\n" if isinstance(value, str) else MINIMAL + "state: {redis_url: 5}"
    )
    assert problems(tmp_path, text) == [f"state.redis_url: {message}"]


def test_a_password_in_the_redis_url_is_refused_without_being_shown(tmp_path):
    found = problems(tmp_path, MINIMAL + f"state: {{redis_url: 'redis://admin:{REDIS_PASSWORD}@redis:6379/0'}}\n")
    assert found == ["state.redis_url: must not carry a password (redis://***@redis:6379/0); put it in state.password"]


def test_a_user_name_in_the_redis_url_is_accepted_and_shown_redacted(tmp_path):
    config = load(tmp_path, MINIMAL + "state: {redis_url: 'redis://proxyuser@redis:6379/0'}\n")
    assert config.state.redacted_url == "redis://***@redis:6379/0"
    assert "proxyuser" not in config.state.describe()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:p@h:1/0", "redis://***@h:1/0"),
        ("rediss://h:1", "rediss://h:1"),
        ("redis://a@b@h/0", "redis://***@h/0"),
        ("u:p@h", "***"),
    ],
)
def test_redacting_a_url_drops_everything_before_the_host(url, shown):
    assert redact_url(url) == shown


def test_each_bad_state_setting_is_reported_by_its_path(tmp_path):
    found = problems(
        tmp_path,
        MINIMAL
        + """
state:
  redis_url: redis://redis:6379
  password: {env: ST_NO_SUCH_VAR}
  ca_file: /no/such/ca.pem
  key_prefix: 5
  timeout_ms: 0
  fallback_rate_fraction: 1.5
  db: 1
""",
    )
    assert sorted(found) == sorted(
        [
            "state.password: env var ST_NO_SUCH_VAR is not set",
            "state.ca_file: file /no/such/ca.pem does not exist",
            "state.key_prefix: expected a printable string of at most 64 characters",
            "state.timeout_ms: expected a number > 0",
            "state.fallback_rate_fraction: expected a number > 0 and <= 1 (1/N for N replicas)",
            "state.db: unknown key (expected one of: redis_url, password, ca_file, key_prefix, timeout_ms, "
            "fallback_rate_fraction)",
        ]
    )


def test_a_ca_file_without_rediss_is_a_mistake(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    found = problems(tmp_path, MINIMAL + "state: {redis_url: 'redis://r:6379', ca_file: ca.pem}\n")
    assert found == ["state.ca_file: is only used with a rediss:// URL"]


def test_limits_reload_but_state_needs_a_restart():
    assert "state" in FIXED_AT_START
    assert "limits" not in FIXED_AT_START


def test_check_config_shows_the_limits_and_a_redacted_state_url(tmp_path):
    (tmp_path / "pw").write_text(REDIS_PASSWORD)
    path = write(
        tmp_path,
        MINIMAL.replace("client_secret: {env: ST_CS}}", "client_secret: {env: ST_CS}, rate_per_second: 20}")
        + "limits: {rate_per_second: 40}\nstate: {redis_url: 'redis://proxy@redis:6379/0', password: {file: pw}}\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "st_proxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=ENVIRON,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "limits: 40/s per tenant (burst 10), max wait 5s, max 20 concurrent per tenant" in result.stdout
    assert "  1234567: rate_per_second 20" in result.stdout
    assert f"state: redis redis://***@redis:6379/0, password from file {tmp_path / 'pw'}" in result.stdout
    assert REDIS_PASSWORD not in result.stdout + result.stderr
    assert "proxy@" not in result.stdout


def test_check_config_says_limits_are_off_without_the_section(tmp_path):
    from st_proxy.cli import limits_summary

    assert limits_summary(sim_config()) == ["limits: off (nothing paced; upstream 429s pass through)"]
