"""check-config lists every problem at once: a tenant listed twice is one of them whatever else is wrong, and a secret
that is only whitespace is a problem, not a credential."""

from __future__ import annotations

from pathlib import Path

import pytest

from st_proxy.cli import main
from st_proxy.config import ConfigError, load_file


def check(tmp_path: Path, text: str, capsys) -> tuple[int, list[str]]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    code = main(["check-config", "--config", str(path)], environ={})
    return code, capsys.readouterr().err.splitlines()


@pytest.fixture
def secret_files(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_text("cs1.a-real-secret\n")
    (tmp_path / "blank").write_text(" \t\n\n")
    (tmp_path / "app_key").write_text("ak1.app-key\n")
    return tmp_path


def test_a_tenant_listed_twice_as_string_and_number_is_reported_with_every_other_problem(secret_files, capsys):
    code, problems = check(
        secret_files,
        """
listen: nowhere
app_key: {env: ST_UNSET_APP_KEY}
tenants:
  "77": {client_id: a, client_secret: {file: secret}}
  77: {client_id: b, client_secret: {file: secret}}
""",
        capsys,
    )
    assert code == 2
    assert "tenants.77: tenant listed twice" in problems
    assert any(p.startswith("listen:") for p in problems)
    assert "app_key: env var ST_UNSET_APP_KEY is not set" in problems


def test_a_tenant_listed_twice_is_reported_when_its_first_entry_is_broken_too(secret_files, capsys):
    _, problems = check(
        secret_files,
        """
app_key: {file: app_key}
tenants:
  "77": {client_id: a}
  77: {client_id: b, client_secret: {file: secret}}
""",
        capsys,
    )
    assert "tenants.77.client_secret: is required" in problems
    assert "tenants.77: tenant listed twice" in problems


@pytest.mark.parametrize("where", ["client_secret", "app_key"])
def test_a_secret_file_holding_only_whitespace_is_an_error(secret_files, where):
    secret = "{file: blank}" if where == "client_secret" else "{file: secret}"
    app_key = "{file: blank}" if where == "app_key" else "{file: app_key}"
    path = secret_files / "config.yaml"
    path.write_text(f"app_key: {app_key}\ntenants:\n  5: {{client_id: a, client_secret: {secret}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path, {})
    expected = "tenants.5.client_secret" if where == "client_secret" else "app_key"
    assert caught.value.problems == [f"{expected}: file {secret_files / 'blank'} holds only whitespace"]


def test_an_env_var_holding_only_whitespace_is_an_error(secret_files):
    path = secret_files / "config.yaml"
    path.write_text("app_key: {file: app_key}\ntenants:\n  5: {client_id: a, client_secret: {env: ST_SECRET}}\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path, {"ST_SECRET": "  \n"})
    assert caught.value.problems == ["tenants.5.client_secret: env var ST_SECRET holds only whitespace"]
