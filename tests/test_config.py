"""Loading the YAML config (docs/configuration.md): defaults, secret references, environments, tenants, and every way a
config can be wrong, each reported with its path, all at once, without a secret in sight."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from example_configs import CONFIG_DIR, EXAMPLES, materialize

from st_proxy.config import (
    Address,
    Config,
    ConfigError,
    RoutingConfig,
    ShutdownConfig,
    TokenConfig,
    UpstreamConfig,
    from_environment,
    from_mapping,
    load_file,
)
from st_proxy.config.limits import LimitsConfig, StateConfig
from st_proxy.config.load import _SECTIONS, _TOP_KEYS
from st_proxy.config.model import BUILTIN_ENVIRONMENTS
from st_proxy.config.tenants import TENANT_KEYS as _TENANT_KEYS
from st_proxy.config.values import parse_yaml

# Distinctive values: if any of them shows up in an error or a repr, a secret leaked.
APP_KEY = "ak1.APPKEY-do-not-print-1f3a"
APP_KEY_V2 = "ak1.APPKEY2-do-not-print-77c2"
SECRET_ENV = "cs1.ENVSECRET-do-not-print-9e41"
SECRET_FILE = "cs1.FILESECRET-do-not-print-0b5d"
SECRET_LITERAL = "cs1.LITERAL-do-not-print-c0de"
ALL_SECRETS = (APP_KEY, APP_KEY_V2, SECRET_ENV, SECRET_FILE, SECRET_LITERAL)
ENVIRON = {"ST_APP_KEY": APP_KEY, "ST_APP_KEY_V2": APP_KEY_V2, "ST_CS": SECRET_ENV}

MINIMAL = """
app_key: {env: ST_APP_KEY}
tenants:
  1234567: {client_id: cid.a, client_secret: {env: ST_CS}}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_file(write(tmp_path, text), ENVIRON if environ is None else environ)


def problems(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    return caught.value.problems


def assert_no_secret(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text
        assert secret.split("-")[0] + "-" not in text  # not even the distinctive prefix


# ---- defaults and every key ------------------------------------------------------------------------------------
def test_a_minimal_config_gets_every_default_of_the_design(tmp_path):
    config = load(tmp_path, MINIMAL)
    assert config.listen == Address("127.0.0.1", 8080)
    assert config.admin_listen == Address("127.0.0.1", 9090)
    assert config.routing == RoutingConfig(tenant_header="X-Tenant-ID", default_tenant=None)
    assert config.tokens == TokenConfig(
        refresh_ahead_seconds=120,
        expiry_skew_seconds=30,
        client_auth="client_secret_post",
        authorization_prefix="Bearer ",
        fetch_timeout_seconds=10,
        rejected_cooloff_seconds=60,
        replay_body_limit_bytes=1048576,
        prewarm_concurrency=8,
        scope=None,
    )
    assert config.upstream == UpstreamConfig(
        connect_timeout_seconds=10, read_timeout_seconds=120, max_connections=100, ca_file=None
    )
    assert config.shutdown == ShutdownConfig(drain_seconds=5, timeout_seconds=30)
    tenant = config.tenants["1234567"]
    assert tenant.environment.name == "production"
    assert tenant.environment.auth_url == "https://auth.servicetitan.io/connect/token"
    assert tenant.environment.api_url == "https://api.servicetitan.io"
    assert config.environments["integration"].api_url == "https://api-integration.servicetitan.io"
    assert config.environments["integration"].auth_url == "https://auth-integration.servicetitan.io/connect/token"
    assert (tenant.client_id, tenant.client_secret.reveal(), tenant.app_key.reveal()) == ("cid.a", SECRET_ENV, APP_KEY)
    assert config.warnings == ()


def test_every_key_of_the_design_is_read_when_set(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked at load\n")
    secret_file = tmp_path / "cs"
    secret_file.write_text(SECRET_FILE + "\n")
    config = load(
        tmp_path,
        f"""
        listen: 0.0.0.0:18080
        admin_listen: "[::1]:19090"
        app_key: {{env: ST_APP_KEY}}
        environments:
          staging: {{auth_url: "http://auth.local:8000/connect/token", api_url: "http://gw.local:8000/st/"}}
        routing: {{tenant_header: X-Customer, default_tenant: 42}}
        tenants:
          "42":
            environment: staging
            client_id: cid.b
            client_secret: {{file: {secret_file}}}
            app_key: {{env: ST_APP_KEY_V2}}
        tokens:
          refresh_ahead_seconds: 300
          expiry_skew_seconds: 5.5
          client_auth: client_secret_basic
          authorization_prefix: ""
          fetch_timeout_seconds: 3
          rejected_cooloff_seconds: 600
          replay_body_limit_bytes: 0
          prewarm_concurrency: 2
          scope: "tn.crm.customers:r"
        upstream: {{connect_timeout_seconds: 1, read_timeout_seconds: 900, max_connections: 7, ca_file: {ca}}}
        shutdown: {{drain_seconds: 0, timeout_seconds: 12}}
        security: {{allow_unauthenticated: true}}
    """,
    )
    assert (config.listen, config.admin_listen) == (Address("0.0.0.0", 18080), Address("::1", 19090))
    assert str(config.admin_listen) == "[::1]:19090"
    assert config.routing == RoutingConfig("X-Customer", "42")
    assert config.tokens == TokenConfig(300, 5.5, "client_secret_basic", "", 3, 600, 0, 2, "tn.crm.customers:r")
    assert config.upstream == UpstreamConfig(1, 900, 7, str(ca))
    assert config.shutdown == ShutdownConfig(0, 12)
    tenant = config.tenants["42"]
    assert tenant.environment.name == "staging"
    assert tenant.environment.api_url == "http://gw.local:8000/st"  # the caller's path is appended to it
    assert tenant.environment.auth_url == "http://auth.local:8000/connect/token"
    assert tenant.client_secret.reveal() == SECRET_FILE
    assert tenant.app_key.reveal() == APP_KEY_V2
    assert config.app_key.reveal() == APP_KEY
    assert config.secret_files == (secret_file,)


# ---- secret references ---------------------------------------------------------------------------------------
def test_secrets_come_from_values_env_vars_and_files_with_one_trailing_newline_dropped(tmp_path):
    (tmp_path / "cs").write_text(SECRET_FILE + "\n")
    config = load(
        tmp_path,
        f"""
        app_key: {{value: {APP_KEY}}}
        tenants:
          1: {{client_id: c1, client_secret: {SECRET_LITERAL}}}
          2: {{client_id: c2, client_secret: {{env: ST_CS}}}}
          3: {{client_id: c3, client_secret: {{file: {tmp_path / "cs"}}}}}
    """,
    )
    assert [config.tenants[t].client_secret.reveal() for t in "123"] == [SECRET_LITERAL, SECRET_ENV, SECRET_FILE]
    assert [config.tenants[t].client_secret_ref.describe() for t in "123"] == [
        "a literal in the config",
        "env ST_CS",
        f"file {tmp_path / 'cs'}",
    ]


def test_a_relative_secret_file_is_read_from_the_config_files_directory(tmp_path, monkeypatch):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "cs").write_text(SECRET_FILE)
    monkeypatch.chdir("/")
    config = load(
        tmp_path, "app_key: {env: ST_APP_KEY}\ntenants: {1: {client_id: c, client_secret: {file: secrets/cs}}}"
    )
    assert config.tenants["1"].client_secret.reveal() == SECRET_FILE
    assert config.secret_files == (tmp_path / "secrets" / "cs",)


def test_literal_secrets_produce_a_warning_per_path_and_references_do_not(tmp_path):
    config = load(
        tmp_path,
        f"""
        app_key: {{value: {APP_KEY}}}
        tenants:
          1: {{client_id: c1, client_secret: {SECRET_LITERAL}}}
          2: {{client_id: c2, client_secret: {{env: ST_CS}}}}
    """,
    )
    assert [w.split(":")[0] for w in config.warnings] == ["app_key", "tenants.1.client_secret"]
    assert all("literal secret" in w for w in config.warnings)
    assert_no_secret("\n".join(config.warnings))


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("{env: ST_MISSING}", "tenants.1.client_secret: env var ST_MISSING is not set"),
        ("{env: ST_EMPTY}", "tenants.1.client_secret: env var ST_EMPTY is empty"),
        ("{file: absent}", "tenants.1.client_secret: file {dir}/absent does not exist"),
        ("{file: empty}", "tenants.1.client_secret: file {dir}/empty is empty"),
        ("{file: adir}", "tenants.1.client_secret: file {dir}/adir cannot be read: Is a directory"),
        (
            "{value: a, env: B}",
            "tenants.1.client_secret: a secret reference needs exactly one of 'value', 'env', 'file'",
        ),
        ("{envv: ST_CS}", "tenants.1.client_secret: a secret reference needs exactly one of 'value', 'env', 'file'"),
        ("12345", "tenants.1.client_secret: expected a string or a mapping with one of 'value', 'env', 'file'"),
    ],
)
def test_an_unusable_secret_reference_is_reported_at_its_path(tmp_path, reference, expected):
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "adir").mkdir()
    text = f"app_key: {{env: ST_APP_KEY}}\ntenants: {{1: {{client_id: c, client_secret: {reference}}}}}"
    assert problems(tmp_path, text, {**ENVIRON, "ST_EMPTY": ""}) == [expected.format(dir=tmp_path)]


def test_an_app_key_with_a_line_break_is_refused_without_showing_it(tmp_path):
    (tmp_path / "ak").write_text(APP_KEY + "\n\n")  # two newlines: one is dropped, one would end up in the header
    found = problems(tmp_path, "app_key: {file: ak}\ntenants: {1: {client_id: c, client_secret: {env: ST_CS}}}")
    assert found == [f"app_key: the value from file {tmp_path / 'ak'} contains a line break or control character"]


# ---- environments ---------------------------------------------------------------------------------------------
def test_a_user_environment_is_added_and_a_built_in_one_can_be_overridden_in_part(tmp_path):
    config = load(
        tmp_path,
        """
        app_key: {env: ST_APP_KEY}
        environments:
          production: {api_url: "http://egress.internal:3128/servicetitan/"}
          sandbox: {auth_url: "http://127.0.0.1:8900/connect/token/", api_url: "http://127.0.0.1:8900"}
        tenants:
          1: {client_id: c, client_secret: {env: ST_CS}}
          2: {client_id: c, client_secret: {env: ST_CS}, environment: sandbox}
          3: {client_id: c, client_secret: {env: ST_CS}, environment: integration}
    """,
    )
    production = config.tenants["1"].environment
    assert production.api_url == "http://egress.internal:3128/servicetitan"
    assert production.auth_url == BUILTIN_ENVIRONMENTS["production"]["auth_url"]  # not overridden, kept
    assert config.tenants["2"].environment.auth_url == "http://127.0.0.1:8900/connect/token/"  # used as written
    assert config.tenants["3"].environment.api_url == BUILTIN_ENVIRONMENTS["integration"]["api_url"]
    assert set(config.environments) == {"integration", "production", "sandbox"}


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        ("{api_url: http://x}", ["environments.e.auth_url: is required"]),
        (
            "{auth_url: 'ftp://x/t', api_url: http://x}",
            ["environments.e.auth_url: expected an http(s) URL, got 'ftp://x/t'"],
        ),
        (
            "{auth_url: http://x/t, api_url: 'http://x/?a=1'}",
            ["environments.e.api_url: must not carry a query or fragment"],
        ),
        ("{auth_url: http://x/t, api_url: 5}", ["environments.e.api_url: expected an http(s) URL, got a number"]),
        ("{auth_url: http://x/t, api_url: 'http://x:99999'}", ["environments.e.api_url: not a valid URL"]),
        (
            "{auth_url: http://x/t, api_url: http://x, region: eu}",
            ["environments.e.region: unknown key (expected one of: auth_url, api_url)"],
        ),
        ("[http://x]", ["environments.e: expected a mapping with auth_url and api_url, got a list"]),
    ],
)
def test_a_broken_environment_is_reported_once_and_its_tenants_do_not_add_noise(tmp_path, urls, expected):
    text = f"""
        app_key: {{env: ST_APP_KEY}}
        environments: {{e: {urls}}}
        tenants: {{1: {{client_id: c, client_secret: {{env: ST_CS}}, environment: e}}}}
    """
    assert problems(tmp_path, text) == expected


def test_a_url_with_credentials_is_refused_without_echoing_them(tmp_path):
    found = problems(
        tmp_path,
        f"""
        app_key: {{env: ST_APP_KEY}}
        environments: {{e: {{auth_url: "https://cid:{SECRET_LITERAL}@auth.example/t", api_url: "https://api.example"}}}}
        tenants: {{1: {{client_id: c, client_secret: {{env: ST_CS}}, environment: e}}}}
    """,
    )
    assert found == [
        "environments.e.auth_url: must not carry credentials (user:password@); the tenant's client_id and "
        "secret are used"
    ]


def test_a_tenant_naming_an_unknown_environment_lists_the_known_ones(tmp_path):
    text = "app_key: {env: ST_APP_KEY}\ntenants: {1: {client_id: c, client_secret: {env: ST_CS}, environment: prod}}"
    assert problems(tmp_path, text) == [
        "tenants.1.environment: unknown environment 'prod' (known: integration, production)"
    ]


# ---- tenants --------------------------------------------------------------------------------------------------
def test_unquoted_and_quoted_tenant_ids_are_the_same_string_ids(tmp_path):
    config = load(
        tmp_path,
        """
        app_key: {env: ST_APP_KEY}
        routing: {default_tenant: 1234567}
        tenants:
          1234567: {client_id: c, client_secret: {env: ST_CS}}
          "18446744073709551615": {client_id: d, client_secret: {env: ST_CS}}
    """,
    )
    assert set(config.tenants) == {"1234567", "18446744073709551615"}
    assert config.routing.default_tenant == "1234567"
    assert config.tenants["1234567"].tenant_id == "1234567"


def test_the_same_tenant_quoted_and_unquoted_is_listed_twice(tmp_path):
    text = """
        app_key: {env: ST_APP_KEY}
        tenants:
          42: {client_id: c, client_secret: {env: ST_CS}}
          "42": {client_id: d, client_secret: {env: ST_CS}}
    """
    assert problems(tmp_path, text) == ["tenants.42: tenant listed twice"]


def test_a_key_written_twice_in_yaml_is_an_error_not_a_silent_overwrite(tmp_path):
    text = """\
        app_key: {env: ST_APP_KEY}
        tenants:
          42: {client_id: c, client_secret: {env: ST_CS}}
          42: {client_id: d, client_secret: {env: ST_CS}}
    """
    assert problems(tmp_path, text) == [
        f"{tmp_path / 'config.yaml'}: invalid YAML at line 4, column 3: duplicate key 42 (first at line 3)"
    ]


def test_a_tenant_may_carry_its_own_app_key_for_a_scope_migration(tmp_path):
    config = load(
        tmp_path,
        """
        app_key: {env: ST_APP_KEY}
        tenants:
          1: {client_id: c, client_secret: {env: ST_CS}}
          2: {client_id: c, client_secret: {env: ST_CS}, app_key: {env: ST_APP_KEY_V2}}
    """,
    )
    assert config.tenants["1"].app_key.reveal() == APP_KEY
    assert config.tenants["2"].app_key.reveal() == APP_KEY_V2
    assert config.tenants["2"].app_key_ref.describe() == "env ST_APP_KEY_V2"


@pytest.mark.parametrize(
    ("tenants", "expected"),
    [
        (None, ["tenants: is required (at least one tenant)"]),
        ("{}", ["tenants: is empty (at least one tenant is required)"]),
        ("[1, 2]", ["tenants: expected a mapping of tenant id to its credentials, got a list"]),
        ("{abc: {client_id: c, client_secret: x}}", ["tenants.abc: a tenant id must be digits"]),
        ("{-5: {client_id: c, client_secret: x}}", ["tenants.-5: a tenant id must be digits"]),
        ('{"12\\n": {client_id: c, client_secret: x}}', ["tenants.'12\\n': a tenant id must be digits"]),
        ("{1: cid.a}", ["tenants.1: expected a mapping with client_id and client_secret, got a string"]),
        ("{1: {client_secret: {env: ST_CS}}}", ["tenants.1.client_id: is required"]),
        (
            "{1: {client_id: 77, client_secret: {env: ST_CS}}}",
            ["tenants.1.client_id: expected a non-empty string, got a number"],
        ),
        ("{1: {client_id: c}}", ["tenants.1.client_secret: is required"]),
    ],
)
def test_tenant_problems_are_reported_at_their_path(tmp_path, tenants, expected):
    text = "app_key: {env: ST_APP_KEY}\n" + (f"tenants: {tenants}\n" if tenants else "")
    assert problems(tmp_path, text) == expected


# ---- routing --------------------------------------------------------------------------------------------------
def test_routing_tenant_header_null_turns_header_routing_off(tmp_path):
    config = load(tmp_path, MINIMAL + "routing: {tenant_header: null}\n")
    assert config.routing.tenant_header is None


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ("{default_tenant: 99}", "routing.default_tenant: tenant 99 is not configured under tenants"),
        ("{default_tenant: acme}", "routing.default_tenant: a tenant id must be digits"),
        ("{tenant_header: 'X Tenant'}", "routing.tenant_header: expected a header name (letters, digits, '-') or null"),
        (
            "{tenant_header: ST-App-Key}",
            "routing.tenant_header: ST-App-Key is a header the proxy sets or strips itself",
        ),
        ("[X-Tenant-ID]", "routing: expected a mapping, got a list"),
    ],
)
def test_routing_problems_are_reported_at_their_path(tmp_path, routing, expected):
    assert problems(tmp_path, MINIMAL + f"routing: {routing}\n") == [expected]


def test_a_default_tenant_whose_own_entry_is_broken_gets_no_second_problem(tmp_path):
    text = "app_key: {env: ST_APP_KEY}\nrouting: {default_tenant: 5}\ntenants: {5: {client_id: c, client_secret: {env: ST_NO}}}"
    assert problems(tmp_path, text) == ["tenants.5.client_secret: env var ST_NO is not set"]


# ---- listen addresses -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        ("localhost:1", Address("localhost", 1)),
        (":8080", Address("0.0.0.0", 8080)),
        ("'[::]:8080'", Address("::", 8080)),
        ("'[::1]:0'", Address("::1", 0)),
    ],
)
def test_listen_accepts_host_port_bracketed_ipv6_and_bare_port(tmp_path, listen, expected):
    text = MINIMAL + f"listen: {listen}\nadmin_listen: 127.0.0.1:19999\nsecurity: {{allow_unauthenticated: true}}\n"
    assert load(tmp_path, text).listen == expected


@pytest.mark.parametrize(
    "listen", ["8080", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:65536", "::1:8080", "1:²", "8080.5"]
)
def test_listen_refuses_anything_else(tmp_path, listen):
    (found,) = problems(tmp_path, MINIMAL + f"listen: '{listen}'\n")
    assert found.startswith("listen: ")


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        (":9090", None),
        ("'[::]:7000'", "10.0.0.1:7000"),
    ],
)
def test_the_admin_port_may_never_be_the_data_port(tmp_path, listen, admin):
    text = MINIMAL + f"listen: {listen}\n" + (f"admin_listen: {admin}\n" if admin else "")
    (found,) = problems(tmp_path, text + "security: {allow_unauthenticated: true}\n")
    assert found.startswith("admin_listen: ") and "clashes with listen" in found


def test_both_ports_may_be_zero_for_an_ephemeral_pick(tmp_path):
    config = load(tmp_path, MINIMAL + "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n")
    assert config.listen.port == config.admin_listen.port == 0


# ---- sections -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("tokens: {expiry_skew_seconds: -1}", "tokens.expiry_skew_seconds: expected a number of seconds >= 0"),
        ("tokens: {refresh_ahead_seconds: '120'}", "tokens.refresh_ahead_seconds: expected a number of seconds >= 0"),
        ("tokens: {refresh_ahead_seconds: true}", "tokens.refresh_ahead_seconds: expected a number of seconds >= 0"),
        (
            "tokens: {rejected_cooloff_seconds: .inf}",
            "tokens.rejected_cooloff_seconds: expected a number of seconds >= 0",
        ),
        ("tokens: {fetch_timeout_seconds: 0}", "tokens.fetch_timeout_seconds: must be greater than 0"),
        ("tokens: {client_auth: basic}", "tokens.client_auth: expected one of client_secret_post, client_secret_basic"),
        ("tokens: {authorization_prefix: null}", "tokens.authorization_prefix: expected a string, got null"),
        (
            'tokens: {authorization_prefix: "Bearer\\r\\n"}',
            "tokens.authorization_prefix: must not contain control characters (it starts a header value)",
        ),
        ("tokens: {prewarm_concurrency: 0}", "tokens.prewarm_concurrency: expected a whole number >= 1"),
        ("tokens: {replay_body_limit_bytes: 1.5}", "tokens.replay_body_limit_bytes: expected a whole number >= 0"),
        ("tokens: {scope: [a]}", "tokens.scope: expected a string or null, got a list"),
        ("upstream: {max_connections: -1}", "upstream.max_connections: expected a whole number >= 1"),
        ("upstream: {read_timeout_seconds: 0}", "upstream.read_timeout_seconds: must be greater than 0"),
        ("upstream: {ca_file: /nonexistent/ca.pem}", "upstream.ca_file: file /nonexistent/ca.pem does not exist"),
        ("shutdown: {drain_seconds: -0.5}", "shutdown.drain_seconds: expected a number of seconds >= 0"),
        ("shutdown: 30", "shutdown: expected a mapping, got a number"),
    ],
)
def test_a_bad_setting_is_reported_at_its_path(tmp_path, section, expected):
    assert problems(tmp_path, MINIMAL + section + "\n") == [expected]


def test_empty_sections_mean_all_defaults(tmp_path):
    config = load(tmp_path, MINIMAL + "tokens:\nupstream: {}\nshutdown:\nrouting:\nenvironments:\n")
    assert (config.tokens, config.upstream, config.shutdown, config.routing) == (
        TokenConfig(),
        UpstreamConfig(),
        ShutdownConfig(),
        RoutingConfig(),
    )


# ---- unknown keys and all problems at once ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("quota: {}", "quota"),  # a section that does not exist
        ("security: {open: true}", "security.open"),
        ("tokens: {refresh_ahead: 60}", "tokens.refresh_ahead"),
        ("upstream: {timeout: 5}", "upstream.timeout"),
        ("shutdown: {drain: 5}", "shutdown.drain"),
        ("routing: {header: X-T}", "routing.header"),
        ("environments: {e: {auth_url: 'http://a/t', api_url: 'http://a', api: x}}", "environments.e.api"),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(tmp_path, extra, path):
    (found,) = problems(tmp_path, MINIMAL + extra + "\n")
    assert found.startswith(f"{path}: unknown key (expected one of: ")


def test_an_unknown_key_in_a_tenant_is_rejected_with_its_path(tmp_path):
    text = "app_key: {env: ST_APP_KEY}\ntenants: {1: {client_id: c, client_secret: {env: ST_CS}, clientsecret: x}}"
    assert problems(tmp_path, text) == [
        "tenants.1.clientsecret: unknown key (expected one of: environment, client_id, client_secret, app_key, rate_per_second)"
    ]


def test_every_problem_is_reported_at_once_each_with_its_path(tmp_path):
    found = problems(
        tmp_path,
        f"""
        listen: nowhere
        app_key: {{env: ST_NOT_SET}}
        colour: blue
        environments: {{e: {{api_url: "http://x"}}}}
        routing: {{default_tenant: 8}}
        tenants:
          1: {{client_id: c, client_secret: {{file: missing}}, environment: e}}
          2: {{client_id: c, client_secret: {SECRET_LITERAL}, environment: mars}}
        tokens: {{client_auth: jwt}}
        upstream: {{max_connections: 0}}
        shutdown: {{timeout_seconds: -1}}
    """,
    )
    assert [p.split(": ")[0] for p in found] == [
        "colour",
        "listen",
        "app_key",
        "environments.e.auth_url",
        "tenants.1.client_secret",
        "tenants.2.environment",
        "routing.default_tenant",
        "tokens.client_auth",
        "upstream.max_connections",
        "shutdown.timeout_seconds",
    ]
    assert_no_secret("\n".join(found))


# ---- the document itself ----------------------------------------------------------------------------------------
def test_invalid_yaml_is_reported_with_its_line_and_column(tmp_path):
    path = write(tmp_path, "app_key: {env: ST_APP_KEY}\ntenants:\n  1: {client_id: c, client_secret: [x\n")
    with pytest.raises(ConfigError) as caught:
        load_file(path, ENVIRON)
    (found,) = caught.value.problems
    assert found.startswith(f"{path}: invalid YAML at line 4, column 1: ")


def test_a_yaml_error_on_a_line_holding_a_secret_does_not_quote_the_line(tmp_path):
    text = f"app_key: {APP_KEY}\ntenants: {{1: {{client_id: c, client_secret: '{SECRET_LITERAL}}}}}\n"
    (found,) = problems(tmp_path, text)
    assert "invalid YAML at line" in found
    assert_no_secret(found)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "(top): the config is empty; it needs at least app_key and tenants"),
        ("# only a comment\n", "(top): the config is empty; it needs at least app_key and tenants"),
        ("- listen: 1\n", "(top): expected a mapping of settings, got a list"),
        ("just text\n", "(top): expected a mapping of settings, got a string"),
    ],
)
def test_a_document_that_is_not_a_mapping_is_one_clear_problem(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_a_missing_config_file_is_reported_by_its_path(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_file(tmp_path / "nope.yaml", {})
    assert caught.value.problems == [f"{tmp_path / 'nope.yaml'}: config file does not exist"]


def test_the_app_key_is_required(tmp_path):
    assert problems(tmp_path, "tenants: {1: {client_id: c, client_secret: {env: ST_CS}}}") == ["app_key: is required"]


# ---- no secret in a repr or an error ----------------------------------------------------------------------------
def test_no_repr_of_a_loaded_config_shows_a_secret(tmp_path):
    (tmp_path / "cs").write_text(SECRET_FILE + "\n")
    config = load(
        tmp_path,
        f"""
        app_key: {APP_KEY}
        tenants:
          1: {{client_id: c, client_secret: {SECRET_LITERAL}, app_key: {{env: ST_APP_KEY_V2}}}}
          2: {{client_id: c, client_secret: {{file: cs}}}}
          3: {{client_id: c, client_secret: {{env: ST_CS}}}}
    """,
    )
    shown = [
        repr(config),
        str(config),
        *(repr(t) for t in config.tenants.values()),
        repr(config.app_key_ref),
        *config.warnings,
    ]
    for text in shown:
        assert_no_secret(text)
    assert config.tenants["1"].client_secret.reveal() == SECRET_LITERAL  # the value is there, only never shown


def test_no_error_message_shows_a_secret_even_when_secrets_resolve(tmp_path):
    (tmp_path / "cs").write_text(SECRET_FILE + "\n")
    with pytest.raises(ConfigError) as caught:
        load(
            tmp_path,
            f"""
            app_key: {APP_KEY}
            tenants:
              1: {{client_id: c, client_secret: {SECRET_LITERAL}, environment: nope}}
              2: {{client_id: 5, client_secret: {{file: cs}}}}
              3: {{client_id: c, client_secret: {{env: ST_CS}}, app_key: {{value: {APP_KEY_V2}, env: X}}}}
        """,
        )
    assert len(caught.value.problems) == 3
    assert_no_secret(str(caught.value))
    assert_no_secret(repr(caught.value))


def test_a_rotated_secret_changes_the_tenants_credentials_key(tmp_path):
    one = load(tmp_path, MINIMAL, {**ENVIRON, "ST_CS": "cs1.old"}).tenants["1234567"]
    two = load(tmp_path, MINIMAL, {**ENVIRON, "ST_CS": "cs1.new"}).tenants["1234567"]
    assert one.credentials_key() != two.credentials_key()
    assert "cs1.old" not in repr(one.credentials_key())


def test_from_mapping_validates_an_already_parsed_document():
    config = from_mapping(
        {"app_key": {"value": "k"}, "tenants": {5: {"client_id": "c", "client_secret": {"env": "S"}}}}, {"S": "s"}
    )
    assert list(config.tenants) == ["5"] and config.source is None


# ---- no-file mode ---------------------------------------------------------------------------------------------
BASE_ENV = {"ST_APP_KEY": APP_KEY, "ST_TENANT_ID": "1234567", "ST_CLIENT_ID": "cid.env", "ST_CLIENT_SECRET": SECRET_ENV}


def test_no_file_mode_builds_one_production_tenant_from_the_environment():
    config = from_environment(BASE_ENV)
    tenant = config.tenants["1234567"]
    assert list(config.tenants) == ["1234567"]
    assert tenant.environment.name == "production"
    assert (tenant.client_id, tenant.client_secret.reveal(), tenant.app_key.reveal()) == (
        "cid.env",
        SECRET_ENV,
        APP_KEY,
    )
    assert tenant.client_secret_ref.describe() == "env ST_CLIENT_SECRET"
    assert (config.listen, config.admin_listen) == (Address("127.0.0.1", 8080), Address("127.0.0.1", 9090))
    assert config.warnings == () and config.source is None


def test_no_file_mode_takes_the_environment_name_and_listen_addresses():
    config = from_environment(
        {
            **BASE_ENV,
            "ST_ENVIRONMENT": "integration",
            "ST_PROXY_LISTEN": ":8000",
            "ST_PROXY_ADMIN_LISTEN": "127.0.0.1:8001",
            "ST_PROXY_ALLOW_UNAUTHENTICATED": "true",
        }
    )
    assert config.tenants["1234567"].environment.api_url == "https://api-integration.servicetitan.io"
    assert (config.listen, config.admin_listen) == (Address("0.0.0.0", 8000), Address("127.0.0.1", 8001))


def test_no_file_mode_auth_and_api_urls_make_a_custom_environment():
    config = from_environment(
        {
            **BASE_ENV,
            "ST_AUTH_URL": "http://127.0.0.1:8900/connect/token",
            "ST_API_URL": "http://127.0.0.1:8900/prefix/",
        }
    )
    env = config.tenants["1234567"].environment
    assert (env.name, env.auth_url, env.api_url) == (
        "custom",
        "http://127.0.0.1:8900/connect/token",
        "http://127.0.0.1:8900/prefix",
    )


def test_no_file_mode_url_with_a_named_environment_overrides_that_environment():
    config = from_environment({**BASE_ENV, "ST_ENVIRONMENT": "integration", "ST_API_URL": "http://egress:3128"})
    env = config.tenants["1234567"].environment
    assert (env.name, env.api_url, env.auth_url) == (
        "integration",
        "http://egress:3128",
        BUILTIN_ENVIRONMENTS["integration"]["auth_url"],
    )


def test_no_file_mode_lists_every_missing_variable_by_name():
    with pytest.raises(ConfigError) as caught:
        from_environment({"ST_TENANT_ID": "5", "ST_CLIENT_ID": ""})
    assert caught.value.problems[1:] == [
        "env.ST_APP_KEY: is not set (or empty)",
        "env.ST_CLIENT_ID: is not set (or empty)",
        "env.ST_CLIENT_SECRET: is not set (or empty)",
    ]
    assert caught.value.problems[0].startswith("env: no config file (--config or ST_PROXY_CONFIG)")


def test_no_file_mode_lists_bad_values_together_with_missing_variables():
    with pytest.raises(ConfigError) as caught:
        from_environment({"ST_TENANT_ID": "acme", "ST_PROXY_LISTEN": "nowhere"})
    assert caught.value.problems[1:] == [
        "env.ST_APP_KEY: is not set (or empty)",
        "env.ST_CLIENT_ID: is not set (or empty)",
        "env.ST_CLIENT_SECRET: is not set (or empty)",
        "env.ST_PROXY_LISTEN: expected HOST:PORT, [IPV6]:PORT or :PORT with a port 0-65535, got 'nowhere'",
        "env.ST_TENANT_ID: a tenant id must be digits",
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"ST_TENANT_ID": "acme"}, "env.ST_TENANT_ID: a tenant id must be digits"),
        (
            {"ST_ENVIRONMENT": "staging"},
            "env.ST_ENVIRONMENT: unknown environment 'staging' (known: integration, production)",
        ),
        ({"ST_API_URL": "http://x"}, "env.ST_AUTH_URL: is not set (a custom environment needs it with ST_API_URL)"),
        ({"ST_AUTH_URL": "http://x/t"}, "env.ST_API_URL: is not set (a custom environment needs it with ST_AUTH_URL)"),
        ({"ST_AUTH_URL": "x", "ST_API_URL": "http://x"}, "env.ST_AUTH_URL: expected an http(s) URL, got 'x'"),
        (
            {"ST_PROXY_LISTEN": "8080"},
            "env.ST_PROXY_LISTEN: expected HOST:PORT, [IPV6]:PORT or :PORT with a port 0-65535, got '8080'",
        ),
        (
            {"ST_PROXY_ADMIN_LISTEN": "127.0.0.1:8080"},
            "env.ST_PROXY_ADMIN_LISTEN: 127.0.0.1:8080 clashes with listen 127.0.0.1:8080: the admin port is never the data port",
        ),
    ],
)
def test_no_file_mode_errors_name_the_variable_to_fix(extra, expected):
    with pytest.raises(ConfigError) as caught:
        from_environment({**BASE_ENV, **extra})
    assert caught.value.problems == [expected]
    assert_no_secret(str(caught.value))


def test_no_file_mode_treats_an_empty_environment_name_as_unset():
    assert from_environment({**BASE_ENV, "ST_ENVIRONMENT": ""}).tenants["1234567"].environment.name == "production"


# ---- the example configs in config/ -----------------------------------------------------------------------------
def test_there_are_example_configs_to_check():
    assert {"example.yaml", "multi-tenant.yaml"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_config_validates_once_its_secrets_exist(tmp_path, name):
    example = materialize(name, tmp_path)
    config = load_file(example.path, example.environ)
    assert config.tenants
    assert config.warnings == ()  # an example never teaches literal secrets
    for tenant in config.tenants.values():
        assert tenant.client_secret.reveal() in example.secrets
        assert tenant.app_key.reveal() in example.secrets


def test_the_complete_example_shows_every_key_with_its_default(tmp_path):
    raw = parse_yaml((CONFIG_DIR / "example.yaml").read_text())
    assert set(raw) == set(_TOP_KEYS)
    for name, (_, fields) in _SECTIONS.items():
        assert set(raw[name]) == set(fields), name
    assert set(raw["routing"]) == {"tenant_header", "default_tenant"}
    assert set().union(*(spec for spec in raw["tenants"].values())) == set(_TENANT_KEYS)
    assert set(raw["environments"]) == set(BUILTIN_ENVIRONMENTS)

    example = materialize("example.yaml", tmp_path)
    config = load_file(example.path, example.environ)
    assert (config.tokens, config.upstream, config.shutdown, config.routing) == (
        TokenConfig(),
        UpstreamConfig(),
        ShutdownConfig(),
        RoutingConfig(),
    )
    assert (config.listen, config.admin_listen) == (Config.listen, Config.admin_listen)
    assert (config.limits, config.state) == (LimitsConfig(), StateConfig())
    assert {n: {"auth_url": e.auth_url, "api_url": e.api_url} for n, e in config.environments.items()} == (
        BUILTIN_ENVIRONMENTS
    )


def test_the_multi_tenant_example_spans_two_environments_with_file_secrets_and_an_app_key_migration(tmp_path):
    example = materialize("multi-tenant.yaml", tmp_path)
    config = load_file(example.path, example.environ)
    tenants = config.tenants.values()
    assert {t.environment.name for t in tenants} == {"production", "integration"}
    assert all(t.client_secret_ref.kind == "file" for t in tenants)
    assert config.app_key_ref.kind == "file"
    migrated = [t for t in tenants if t.app_key_ref != config.app_key_ref]
    assert migrated and len(migrated) < len(config.tenants)  # some tenants moved to the new app key, not all
    assert all(t.app_key != config.app_key for t in migrated)


@pytest.mark.parametrize(
    ("listen", "warned"),
    [
        ("127.0.0.1:8080", False),
        ("127.8.9.1:8080", False),
        ("'[::1]:8080'", False),
        ("localhost:8080", False),
        (":8080", True),
        ("0.0.0.0:8080", True),
        ("10.1.2.3:8080", True),
        ("'[::]:8080'", True),
        ("proxy.internal:8080", True),
    ],
)
def test_a_data_port_beyond_loopback_is_warned_about(tmp_path, listen, warned):
    # Without clients a non-loopback port is refused unless allowed (tests/test_clients_config.py); allowed, it warns.
    text = MINIMAL + f"listen: {listen}\nadmin_listen: 127.0.0.1:19999\nsecurity: {{allow_unauthenticated: true}}\n"
    config = load(tmp_path, text)
    assert [w.startswith("listen: ") for w in config.warnings] == ([True] if warned else [])
