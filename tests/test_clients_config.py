"""The clients: and security: sections (docs/security.md): every problem with its path, secrets never shown, the
closed-by-default rule at load, in no-file mode, in check-config and for the real `st-proxy` process (exit 2)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from client_setup import basic
from conftest import T1
from serve_process import ServeProcess, no_file_environment

from st_proxy.cli import main
from st_proxy.config import ConfigError, from_environment, load_file
from st_proxy.config.security import SecurityConfig

CLIENT_SECRET = "cl1.CLIENTSECRET-do-not-print-5a9e0c3b"  # 37 characters
SHORT_SECRET = "cl1.SHORT-9d1e2f"  # 16 characters: allowed, but check-config warns
SIGNING_KEY = "sk1.SIGNINGKEY-do-not-print-77aa00bbccdd"
ADMIN_TOKEN = "at1.ADMINTOKEN-do-not-print-31415"
ENVIRON = {
    "ST_APP_KEY": "ak1.APPKEY-do-not-print-1f3a",
    "ST_CS": "cs1.ENVSECRET-do-not-print-9e41",
    "CLIENT_A": CLIENT_SECRET,
    "CLIENT_SHORT": SHORT_SECRET,
    "SIGNING": SIGNING_KEY,
    "ADMIN": ADMIN_TOKEN,
}
SECRETS = tuple(ENVIRON.values())
MINIMAL = """
app_key: {env: ST_APP_KEY}
tenants:
  1234567: {client_id: cid.a, client_secret: {env: ST_CS}}
  7654321: {client_id: cid.b, client_secret: {env: ST_CS}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(MINIMAL) + textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_file(write(tmp_path, text), ENVIRON)
    for secret in SECRETS:
        assert secret not in str(caught.value)
    return caught.value.problems


def test_clients_are_read_with_their_secrets_and_tenants(tmp_path):
    config = load_file(
        write(
            tmp_path,
            """
            clients:
              billing-sync: {secret: {env: CLIENT_A}, tenants: ["1234567", 7654321]}
              reports.v2_x: {secrets: [{env: CLIENT_A}, {env: CLIENT_SHORT}], tenants: ["*"]}
            """,
        ),
        ENVIRON,
    )
    billing, reports = config.clients["billing-sync"], config.clients["reports.v2_x"]
    assert billing.tenants == frozenset({"1234567", "7654321"}) and billing.allows("1234567")
    assert not billing.allows("42")
    assert reports.tenants is None and reports.allows("42")
    assert [s.reveal() for s in reports.secrets] == [CLIENT_SECRET, SHORT_SECRET]
    assert CLIENT_SECRET not in repr(config.clients)
    assert config.security == SecurityConfig()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("clients: []", ["clients: expected a mapping of client name to its secret and tenants, got a list"]),
        (
            "clients: {'bad name': {secret: {env: CLIENT_A}, tenants: ['*']}}",
            ["clients.'bad name': a client name is 1 to 64 letters, digits, '.', '_' or '-'"],
        ),
        (
            f"clients: {{{'x' * 65}: {{secret: {{env: CLIENT_A}}, tenants: ['*']}}}}",
            [f"clients.'{'x' * 65}': a client name is 1 to 64 letters, digits, '.', '_' or '-'"],
        ),
        (
            "clients: {a: {tenants: ['*']}}",
            ["clients.a.secret: exactly one of 'secret' or 'secrets' (a list, while rotating) is required"],
        ),
        (
            "clients: {a: {secret: {env: CLIENT_A}, secrets: [{env: CLIENT_A}], tenants: ['*']}}",
            ["clients.a.secret: exactly one of 'secret' or 'secrets' (a list, while rotating) is required"],
        ),
        (
            "clients: {a: {secrets: [], tenants: ['*']}}",
            ["clients.a.secrets: expected a non-empty list of secret references, got a list"],
        ),
        (
            "clients: {a: {secret: {env: NOPE}, tenants: ['*']}}",
            ["clients.a.secret: env var NOPE is not set"],
        ),
        (
            "clients: {a: {secrets: [{env: CLIENT_A}, {value: short}], tenants: ['*']}}",
            [
                "clients.a.secrets.1: a client secret needs at least 16 characters (the one from a literal in the "
                "config has 5)"
            ],
        ),
        (
            "clients: {a: {secret: {env: CLIENT_A}}}",
            ['clients.a.tenants: is required: a list of tenant ids, or ["*"] for every tenant'],
        ),
        (
            "clients: {a: {secret: {env: CLIENT_A}, tenants: []}}",
            ['clients.a.tenants: expected a non-empty list of tenant ids or ["*"], got a list'],
        ),
        (
            "clients: {a: {secret: {env: CLIENT_A}, tenants: ['*', '1234567']}}",
            ['clients.a.tenants: "*" stands for every tenant and cannot be combined with ids'],
        ),
        (
            "clients: {a: {secret: {env: CLIENT_A}, tenants: ['12a']}}",
            ['clients.a.tenants.0: a tenant id must be digits (or the whole list ["*"])'],
        ),
        (
            "clients: {a: {secret: {env: CLIENT_A}, tenants: ['*'], scopes: [x]}}",
            ["clients.a.scopes: unknown key (expected one of: secret, secrets, tenants)"],
        ),
        ("security: []", ["security: expected a mapping, got a list"]),
        (
            "security: {allow_unauthenticated: 'yes'}",
            ["security.allow_unauthenticated: expected true or false, got a string"],
        ),
        (
            "security: {require_header: 'X Bad'}",
            ["security.require_header: expected a header name (letters, digits, '-') or null"],
        ),
        (
            "security: {require_header: Authorization}",
            ["security.require_header: Authorization is a header the proxy strips or sets itself"],
        ),
        (
            "security: {local_token_ttl_seconds: 0}",
            ["security.local_token_ttl_seconds: expected a number of seconds from 1 to 86400"],
        ),
        ("security: {max_body_bytes: -1}", ["security.max_body_bytes: expected a whole number of bytes >= 0, or null"]),
        ("security: {expose_tenants: maybe}", ["security.expose_tenants: expected auto, true or false"]),
        (
            "security: {token_signing_key: {value: too-short}}",
            ["security.token_signing_key: needs at least 32 characters"],
        ),
        ("security: {admin_token: {env: NOPE}}", ["security.admin_token: env var NOPE is not set"]),
        (
            "security: {admin: x}",
            [
                "security.admin: unknown key (expected one of: allow_unauthenticated, require_header, "
                "local_token_ttl_seconds, token_signing_key, max_body_bytes, expose_tenants, admin_token)"
            ],
        ),
    ],
)
def test_every_problem_is_named_by_its_path_without_a_secret(tmp_path, text, expected):
    assert problems(tmp_path, text) == expected


def test_a_secret_with_a_line_break_is_refused_without_being_shown(tmp_path):
    (tmp_path / "cs").write_text(CLIENT_SECRET + "\n\n")
    found = problems(tmp_path, f"clients: {{a: {{secret: {{file: {tmp_path / 'cs'}}}, tenants: ['*']}}}}")
    assert found == [
        f"clients.a.secret: the value from file {tmp_path / 'cs'} contains a line break or control character"
    ]


def test_all_security_settings_are_read(tmp_path):
    config = load_file(
        write(
            tmp_path,
            """
            clients: {a: {secret: {env: CLIENT_A}, tenants: ['*']}}
            security:
              allow_unauthenticated: true
              require_header: X-ST-Proxy-Request
              local_token_ttl_seconds: 60
              token_signing_key: {env: SIGNING}
              max_body_bytes: 1024
              expose_tenants: true
              admin_token: {env: ADMIN}
            """,
        ),
        ENVIRON,
    )
    sec = config.security
    assert (sec.allow_unauthenticated, sec.require_header, sec.local_token_ttl_seconds) == (
        True,
        "X-ST-Proxy-Request",
        60,
    )
    assert sec.token_signing_key is not None and sec.token_signing_key.reveal() == SIGNING_KEY
    assert sec.admin_token is not None and sec.admin_token.reveal() == ADMIN_TOKEN
    assert (sec.max_body_bytes, sec.expose_tenants) == (1024, True)
    assert SIGNING_KEY not in repr(sec) and ADMIN_TOKEN not in repr(sec)


# ---- closed by default --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("listen", ["0.0.0.0:8080", ":8080", "10.1.2.3:8080", "'[::]:8080'", "proxy.internal:8080"])
def test_a_data_port_beyond_loopback_without_clients_is_refused(tmp_path, listen):
    (found,) = problems(tmp_path, f"listen: {listen}\nadmin_listen: 127.0.0.1:19999\n")
    assert found.startswith("listen: ") and "no clients are configured" in found
    assert "security.allow_unauthenticated: true" in found


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.8.9.1:8080", "'[::1]:8080'", "localhost:8080"])
def test_a_loopback_data_port_needs_no_clients(tmp_path, listen):
    config = load_file(write(tmp_path, f"listen: {listen}\n"), ENVIRON)
    assert not config.clients and config.warnings == ()


def test_allow_unauthenticated_opens_it_with_a_warning(tmp_path):
    config = load_file(write(tmp_path, "listen: 0.0.0.0:8080\nsecurity: {allow_unauthenticated: true}\n"), ENVIRON)
    (warning,) = config.warnings
    assert warning.startswith("listen: 0.0.0.0:8080") and "not authenticated" in warning


def test_clients_open_it_with_a_clear_text_warning(tmp_path):
    text = "listen: 0.0.0.0:8080\nclients: {a: {secret: {env: CLIENT_A}, tenants: ['*']}}\n"
    (warning,) = load_file(write(tmp_path, text), ENVIRON).warnings
    assert warning.startswith("listen: 0.0.0.0:8080") and "clear text" in warning


def test_a_short_client_secret_without_a_signing_key_is_warned_about_and_with_one_it_is_not(tmp_path):
    text = "clients: {a: {secrets: [{env: CLIENT_A}, {env: CLIENT_SHORT}], tenants: ['*']}}\n"
    (warning,) = load_file(write(tmp_path, text), ENVIRON).warnings
    assert warning.startswith("clients.a: the secret from env CLIENT_SHORT has fewer than 32 characters")
    signed = text + "security: {token_signing_key: {env: SIGNING}}\n"
    assert load_file(write(tmp_path, signed), ENVIRON).warnings == ()


BASE_ENV = {"ST_APP_KEY": "k" * 10, "ST_TENANT_ID": "1234567", "ST_CLIENT_ID": "cid", "ST_CLIENT_SECRET": "s" * 10}


def test_no_file_mode_refuses_an_open_listen_and_names_the_variables_that_fix_it():
    with pytest.raises(ConfigError) as caught:
        from_environment({**BASE_ENV, "ST_PROXY_LISTEN": "0.0.0.0:8080"})
    (found,) = caught.value.problems
    assert found.startswith("env.ST_PROXY_LISTEN: 0.0.0.0:8080 is reachable from beyond this host")
    assert "ST_PROXY_CLIENT_SECRET" in found and "ST_PROXY_ALLOW_UNAUTHENTICATED=true" in found


def test_no_file_mode_client_secret_makes_one_client_named_default_for_every_tenant():
    config = from_environment({**BASE_ENV, "ST_PROXY_LISTEN": "0.0.0.0:8080", "ST_PROXY_CLIENT_SECRET": CLIENT_SECRET})
    (client,) = config.clients.values()
    assert (client.name, client.tenants, client.secrets[0].reveal()) == ("default", None, CLIENT_SECRET)


def test_no_file_mode_allow_unauthenticated_and_its_problems_name_the_variables():
    config = from_environment({**BASE_ENV, "ST_PROXY_LISTEN": ":8080", "ST_PROXY_ALLOW_UNAUTHENTICATED": "true"})
    assert config.security.allow_unauthenticated and not config.clients
    with pytest.raises(ConfigError) as caught:
        from_environment({**BASE_ENV, "ST_PROXY_ALLOW_UNAUTHENTICATED": "maybe", "ST_PROXY_CLIENT_SECRET": "short"})
    assert caught.value.problems == [
        "env.ST_PROXY_CLIENT_SECRET: a client secret needs at least 16 characters (the one from env "
        "ST_PROXY_CLIENT_SECRET has 5)",
        "env.ST_PROXY_ALLOW_UNAUTHENTICATED: expected true or false, got a string",
    ]


# ---- check-config and the real process -------------------------------------------------------------------------
def test_check_config_lists_clients_and_where_their_secrets_come_from_never_a_value(tmp_path, capsys):
    path = write(
        tmp_path,
        """
        clients:
          billing-sync: {secrets: [{env: CLIENT_A}, {env: CLIENT_SHORT}], tenants: ["7654321", "1234567"]}
          ops: {secret: {env: CLIENT_A}, tenants: ["*"]}
        security: {admin_token: {env: ADMIN}, require_header: X-ST-Proxy-Request}
        """,
    )
    assert main(["check-config", "--config", str(path)], ENVIRON) == 0
    out = capsys.readouterr()
    assert "clients: 2" in out.out
    assert "  billing-sync: tenants 1234567, 7654321; secrets from env CLIENT_A, env CLIENT_SHORT" in out.out
    assert "  ops: tenants every tenant (*); secret from env CLIENT_A" in out.out
    assert "require_header X-ST-Proxy-Request" in out.out and "admin_token from env ADMIN" in out.out
    assert "fewer than 32 characters" in out.err
    for secret in SECRETS:
        assert secret not in out.out + out.err


def test_check_config_refuses_an_open_listen_with_exit_2(tmp_path, capsys):
    path = write(tmp_path, "listen: 0.0.0.0:8080\n")
    assert main(["check-config", "--config", str(path)], ENVIRON) == 2
    assert "no clients are configured" in capsys.readouterr().err


def test_the_real_process_refuses_to_start_an_open_data_port_with_exit_2(tmp_path):
    path = write(tmp_path, "listen: 0.0.0.0:0\nadmin_listen: 127.0.0.1:0\n")
    result = subprocess.run(
        [sys.executable, "-m", "st_proxy", "serve", "--config", str(path)],
        env={**ENVIRON, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("listen: 0.0.0.0:0 is reachable from beyond this host, but no clients")
    assert "Traceback" not in result.stderr and result.stdout == ""


async def test_no_file_mode_with_a_client_secret_runs_the_real_process_with_callers_authenticated(simulator):
    env = no_file_environment(simulator, T1, ST_PROXY_CLIENT_SECRET=CLIENT_SECRET)
    child = await ServeProcess.start(Path("unused"), command=[sys.executable, "-m", "st_proxy", "serve"], env=env)
    try:
        url = f"{child.url}/crm/v2/tenant/{T1.tenant_id}/customers"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                assert resp.status == 401
            async with session.get(url, headers=basic("default", CLIENT_SECRET)) as resp:
                assert resp.status == 200
    finally:
        await child.close()
    assert CLIENT_SECRET not in child.output()
