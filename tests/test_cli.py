"""The command line's config handling: `check-config`, the no-file mode, ST_PROXY_CONFIG, usage errors and exit codes.

The end-to-end cases run the real console script in a subprocess with a clean environment; the rest call
``proxy.cli.main(argv, environ=...)`` in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from example_configs import materialize

from st_proxy import __version__
from st_proxy.cli import EXIT_CONFIG, EXIT_OK, main

BIN = Path(sys.executable).parent
CONSOLE_SCRIPT = [str(BIN / "st-proxy")] if (BIN / "st-proxy").exists() else [sys.executable, "-m", "st_proxy"]

APP_KEY = "ak1.CLI-APPKEY-never-shown-5a1"
SECRET = "cs1.CLI-SECRET-never-shown-93b"
SECRET_LITERAL = "cs1.CLI-LITERAL-never-shown-d7e"
NO_FILE_ENV = {
    "ST_APP_KEY": APP_KEY,
    "ST_TENANT_ID": "1234567",
    "ST_CLIENT_ID": "cid.sidecar",
    "ST_CLIENT_SECRET": SECRET,
}
# A problem line: a config path (or the file's path) then ": ".
PROBLEM_LINE = re.compile(r"^(\(top\)|env|env\.ST_[A-Z_]+|[\w/.-]+(\.[\w'-]+)*): \S")


def run(args: list[str], env: dict[str, str], *, command: list[str] = CONSOLE_SCRIPT) -> subprocess.CompletedProcess:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}  # no ST_* leaking in from the test's own env
    return subprocess.run([*command, *args], env=clean, capture_output=True, text=True, timeout=60, check=False)


def assert_clean_failure(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == EXIT_CONFIG, result
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- the real console script ----------------------------------------------------------------------------------
def test_check_config_prints_a_redacted_summary_of_the_example_and_exits_0(tmp_path):
    example = materialize("example.yaml", tmp_path)
    result = run(["check-config", "--config", str(example.path)], example.environ)
    assert result.returncode == EXIT_OK, result.stderr
    out = result.stdout
    assert re.search(
        r"^  1234567: environment production \(https://api\.servicetitan\.io\), client_id cid\.abc123, "
        r"client_secret from file \S+/1234567/client_secret, app_key from env ST_APP_KEY$",
        out,
        re.M,
    )
    assert re.search(
        r"^  7654321: environment integration .*client_secret from env ST_CLIENT_SECRET_7654321, "
        r"app_key from env ST_APP_KEY_V2$",
        out,
        re.M,
    )
    assert "app_key: from env ST_APP_KEY" in out
    assert out.rstrip().endswith("config ok")
    assert result.stderr == ""
    for secret in example.secrets:
        assert secret not in out + result.stderr


def test_check_config_lists_every_problem_on_its_own_line_by_path_and_exits_2(tmp_path):
    config = write(
        tmp_path,
        f"""
        listen: 127.0.0.1:80x
        app_key: {APP_KEY}
        tenants:
          1: {{client_id: c, client_secret: {SECRET_LITERAL}, environment: mars}}
          2: {{client_id: c, client_secret: {{env: ST_UNSET}}}}
          acme: {{client_id: c, client_secret: {{env: ST_CS}}}}
        tokens: {{client_auth: jwt, refresh_ahead: 3}}
    """,
    )
    result = run(["check-config", "--config", str(config)], {"ST_CS": SECRET})
    assert_clean_failure(result)
    lines = result.stderr.splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        "listen",
        "tenants.1.environment",
        "tenants.2.client_secret",
        "tenants.acme",
        "tokens.refresh_ahead",
        "tokens.client_auth",
    ]
    assert all(PROBLEM_LINE.match(line) for line in lines), lines
    for secret in (APP_KEY, SECRET, SECRET_LITERAL):
        assert secret not in result.stderr


def test_check_config_without_a_file_reads_the_st_variables(tmp_path):
    result = run(["check-config"], NO_FILE_ENV)
    assert result.returncode == EXIT_OK, result.stderr
    assert "config: environment variables (no-file mode)" in result.stdout
    assert re.search(
        r"^  1234567: environment production .*client_id cid\.sidecar, client_secret from env "
        r"ST_CLIENT_SECRET, app_key from env ST_APP_KEY$",
        result.stdout,
        re.M,
    )
    assert APP_KEY not in result.stdout + result.stderr and SECRET not in result.stdout + result.stderr


def test_check_config_without_a_file_or_variables_names_each_missing_variable():
    result = run(["check-config"], {})
    assert_clean_failure(result)
    assert result.stderr.splitlines()[1:] == [f"env.{name}: is not set (or empty)" for name in NO_FILE_ENV]


def test_python_dash_m_proxy_is_the_same_command(tmp_path):
    result = run(
        ["check-config"], {**NO_FILE_ENV, "ST_ENVIRONMENT": "integration"}, command=[sys.executable, "-m", "st_proxy"]
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert "environment integration" in result.stdout


def test_serve_with_a_broken_config_exits_2_before_listening(tmp_path):
    result = run(["serve", "--config", str(tmp_path / "missing.yaml")], {})
    assert_clean_failure(result)
    assert result.stderr == f"{tmp_path / 'missing.yaml'}: config file does not exist\n"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["check-config", "--bogus"],
        ["serve", "--log-format", "xml"],
        ["serve", "--log-level", "loud"],
        ["check-config", "--config"],
    ],
)
def test_usage_errors_exit_2_with_a_usage_line_and_no_traceback(args):
    result = run(args, NO_FILE_ENV)
    assert_clean_failure(result)
    assert result.stderr.startswith("usage: st-proxy")


# ---- in-process -------------------------------------------------------------------------------------------------
def test_st_proxy_config_names_the_file_when_config_is_not_given(tmp_path, capsys):
    config = write(tmp_path, "app_key: {env: ST_APP_KEY}\ntenants: {42: {client_id: c, client_secret: {env: ST_CS}}}")
    code = main(["check-config"], environ={"ST_PROXY_CONFIG": str(config), "ST_APP_KEY": APP_KEY, "ST_CS": SECRET})
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert f"config: {config}" in out and "  42: environment production" in out


def test_config_on_the_command_line_wins_over_st_proxy_config(tmp_path, capsys):
    good = write(tmp_path, "app_key: {env: ST_APP_KEY}\ntenants: {7: {client_id: c, client_secret: {env: ST_CS}}}")
    environ = {"ST_PROXY_CONFIG": str(tmp_path / "absent.yaml"), "ST_APP_KEY": APP_KEY, "ST_CS": SECRET}
    assert main(["check-config", "--config", str(good)], environ=environ) == EXIT_OK
    assert "  7: environment production" in capsys.readouterr().out


def test_a_config_file_wins_over_the_no_file_variables(tmp_path, capsys):
    config = write(tmp_path, "app_key: {env: ST_APP_KEY}\ntenants: {7: {client_id: c, client_secret: {env: ST_CS}}}")
    assert main(["check-config", "--config", str(config)], environ={**NO_FILE_ENV, "ST_CS": SECRET}) == EXIT_OK
    out = capsys.readouterr().out
    assert "  7: " in out and "1234567" not in out


def test_literal_secrets_pass_with_a_warning_that_does_not_show_them(tmp_path, capsys):
    config = write(tmp_path, f"app_key: {APP_KEY}\ntenants: {{5: {{client_id: c, client_secret: {SECRET_LITERAL}}}}}")
    assert main(["check-config", "--config", str(config)], environ={}) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "warning: app_key: a literal secret in the config file; prefer {env: ...} or {file: ...}",
        "warning: tenants.5.client_secret: a literal secret in the config file; prefer {env: ...} or {file: ...}",
    ]
    assert "client_secret from a literal in the config" in captured.out
    assert APP_KEY not in captured.out + captured.err and SECRET_LITERAL not in captured.out + captured.err


def test_the_summary_shows_a_tenants_own_app_key(tmp_path, capsys):
    example = materialize("multi-tenant.yaml", tmp_path)
    assert main(["check-config", "--config", str(example.path)], environ=example.environ) == EXIT_OK
    out = capsys.readouterr().out
    assert re.search(r"^  2345678: .*app_key from file \S+/app_key_v2$", out, re.M)
    assert re.search(r"^  1234567: .*app_key from file \S+/app_key$", out, re.M)
    assert re.search(r"^  9000001: environment integration ", out, re.M)
    assert not any(secret in out for secret in example.secrets)


def test_invalid_yaml_exits_2_with_the_line_and_column(tmp_path, capsys):
    config = write(tmp_path, "app_key: {env: ST_APP_KEY\ntenants: {}\n")
    assert main(["check-config", "--config", str(config)], environ={}) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert re.fullmatch(rf"{re.escape(str(config))}: invalid YAML at line \d+, column \d+: .+\n", err)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"], environ={})
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"st-proxy {__version__}"
