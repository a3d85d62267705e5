"""The `tls` and `forward_proxy` config sections: every problem named by its path, files read at load, what a reload
may change, and the egress check that keeps the proxy from tunnelling into itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import sim_config
from tls_helpers import issue, make_ca

from st_proxy.config import Address, ConfigError, load_file
from st_proxy.config.tls import authenticates_callers, pin_listeners
from st_proxy.upstream.egress import loops_into


@pytest.fixture
def pki(tmp_path) -> Path:
    ca = make_ca(tmp_path / "ca")
    issue(ca, tmp_path / "server", "localhost")
    return tmp_path


def problems_of(**sections) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        sim_config(**sections)
    return caught.value.problems


def test_tls_and_forward_proxy_are_off_when_absent():
    config = sim_config()
    assert config.tls is None and config.forward_proxy is None
    assert not authenticates_callers(config.tls)


def test_a_valid_tls_section_and_the_predicate_for_caller_authentication(pki):
    plain = sim_config(tls={"cert_file": str(pki / "server/tls.crt"), "key_file": str(pki / "server/tls.key")})
    assert plain.tls is not None and not plain.tls.authenticates_callers
    mtls = sim_config(
        tls={
            "cert_file": str(pki / "server/tls.crt"),
            "key_file": str(pki / "server/tls.key"),
            "client_ca_file": str(pki / "ca/ca.crt"),
        }
    )
    assert authenticates_callers(mtls.tls) and mtls.tls.files[-1] == pki / "ca/ca.crt"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"cert_file": "{p}/server/tls.crt"}, ["tls.key_file: is required"]),
        (
            {"cert_file": "{p}/nope.crt", "key_file": "{p}/server/tls.key"},
            ["tls.cert_file: file {p}/nope.crt does not exist"],
        ),
        (
            {"cert_file": "{p}/server/tls.crt", "key_file": "{p}/server/tls.key", "client_cert": "x"},
            ["tls.client_cert: unknown key (expected one of: cert_file, key_file, client_ca_file)"],
        ),
        (
            {"cert_file": "{p}/server/tls.crt", "key_file": "{p}/ca/ca.key"},
            ["tls.cert_file: the key does not belong to the certificate"],
        ),
        (
            {"cert_file": "{p}/server/tls.key", "key_file": "{p}/server/tls.key"},
            ["tls.cert_file: not a PEM certificate and key"],
        ),
        (
            {
                "cert_file": "{p}/server/tls.crt",
                "key_file": "{p}/server/tls.key",
                "client_ca_file": "{p}/server/tls.key",
            },
            ["tls.client_ca_file: no PEM certificate in it"],
        ),
    ],
)
def test_tls_problems_are_named_by_their_path(pki, section, expected):
    section = {k: v.format(p=pki) for k, v in section.items()}
    assert problems_of(tls=section) == [e.format(p=pki) for e in expected]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"listen": "127.0.0.1:8443"},
            ["forward_proxy.ca_cert_file: is required", "forward_proxy.ca_key_file: is required"],
        ),
        (
            {"listen": "0.0.0.0:8443", "ca_cert_file": "{p}/ca/ca.crt", "ca_key_file": "{p}/ca/ca.key"},
            [
                "forward_proxy.listen: 0.0.0.0:8443 is reachable from beyond this host, but no clients are "
                "configured: anything that could connect would act with every tenant's credentials. Add clients "
                "(docs/security.md), listen on 127.0.0.1, or set security.allow_unauthenticated: true"
            ],
        ),
        (
            {
                "listen": "127.0.0.1:8443",
                "ca_cert_file": "{p}/ca/ca.crt",
                "ca_key_file": "{p}/ca/ca.key",
                "other_hosts": "allow",
            },
            ["forward_proxy.other_hosts: expected one of refuse, tunnel"],
        ),
        (
            {"listen": "127.0.0.1:8443", "ca_cert_file": "{p}/ca/ca.crt", "ca_key_file": "{p}/server/tls.key"},
            ["forward_proxy.ca_key_file: the key does not belong to the certificate"],
        ),
        ({"ca_cert_file": "{p}/ca/ca.crt", "ca_key_file": "{p}/ca/ca.key"}, ["forward_proxy.listen: is required"]),
    ],
)
def test_forward_proxy_problems_are_named_by_their_path(pki, section, expected):
    section = {k: v.format(p=pki) for k, v in section.items()}
    assert problems_of(forward_proxy=section) == expected


def test_relative_certificate_paths_are_read_from_the_config_files_directory(pki):
    (pki / "config.yaml").write_text(
        "app_key: {value: k}\n"
        "tenants: {'1': {client_id: c, client_secret: {value: s}}}\n"
        "tls: {cert_file: server/tls.crt, key_file: server/tls.key}\n"
        "forward_proxy: {listen: '127.0.0.1:0', ca_cert_file: ca/ca.crt, ca_key_file: ca/ca.key}\n"
    )
    config = load_file(pki / "config.yaml", {})
    assert config.tls is not None and config.tls.cert_file == pki / "server/tls.crt"
    assert config.forward_proxy is not None and config.forward_proxy.ca_key_file == pki / "ca/ca.key"
    assert config.forward_proxy.other_hosts == "refuse"


def test_a_reload_keeps_the_listeners_but_takes_new_files(pki):
    cert, key = str(pki / "server/tls.crt"), str(pki / "server/tls.key")
    issue(pki / "ca", pki / "renewed", "localhost")
    fp = {"listen": "127.0.0.1:8443", "ca_cert_file": str(pki / "ca/ca.crt"), "ca_key_file": str(pki / "ca/ca.key")}
    old = sim_config(tls={"cert_file": cert, "key_file": key}, forward_proxy=fp)

    renewed = sim_config(
        tls={"cert_file": str(pki / "renewed/tls.crt"), "key_file": str(pki / "renewed/tls.key")},
        forward_proxy={**fp, "other_hosts": "tunnel"},
    )
    kept, changed = pin_listeners(old, renewed)
    assert changed == [] and kept.tls == renewed.tls and kept.forward_proxy.other_hosts == "tunnel"

    mtls = sim_config(
        tls={"cert_file": cert, "key_file": key, "client_ca_file": str(pki / "ca/ca.crt")},
        forward_proxy={**fp, "listen": "127.0.0.1:9443"},
    )
    kept, changed = pin_listeners(old, mtls)
    assert changed == ["tls.client_ca_file (set or unset)", "forward_proxy.listen"]
    assert kept.tls == old.tls and kept.forward_proxy.listen == Address("127.0.0.1", 8443)

    kept, changed = pin_listeners(old, sim_config())
    assert changed == ["tls", "forward_proxy"] and kept.tls == old.tls and kept.forward_proxy == old.forward_proxy


LISTENERS = {
    "listen": Address("127.0.0.1", 8080),
    "admin_listen": Address("0.0.0.0", 9090),
    "forward_proxy.listen": Address("127.0.0.1", 8443),
}


@pytest.mark.parametrize(
    ("environ", "loops"),
    [
        ({"HTTPS_PROXY": "http://127.0.0.1:8443"}, ["env.HTTPS_PROXY", "forward_proxy.listen"]),
        ({"https_proxy": "localhost:8443"}, ["env.https_proxy", "forward_proxy.listen"]),
        ({"HTTP_PROXY": "http://[::1]:8080"}, ["env.HTTP_PROXY", "listen 127.0.0.1:8080"]),
        ({"ALL_PROXY": "http://127.0.0.2:9090"}, ["env.ALL_PROXY", "admin_listen 0.0.0.0:9090"]),
        ({"HTTPS_PROXY": "http://egress.corp.example:8443"}, []),
        ({"HTTPS_PROXY": "http://127.0.0.1:3128"}, []),
        ({"NO_PROXY": "127.0.0.1:8443"}, []),
    ],
)
def test_an_egress_proxy_pointing_at_one_of_the_listeners_is_found(environ, loops):
    problems = loops_into(environ, LISTENERS)
    if not loops:
        assert problems == []
    else:
        assert len(problems) == 1 and all(part in problems[0] for part in loops), problems


def test_check_config_names_the_tls_files_and_the_forward_proxy(pki, capsys):
    from st_proxy.cli import main

    (pki / "config.yaml").write_text(
        "app_key: {value: k}\n"
        "tenants: {'1': {client_id: c, client_secret: {env: S}}}\n"
        "tls: {cert_file: server/tls.crt, key_file: server/tls.key, client_ca_file: ca/ca.crt}\n"
        "forward_proxy: {listen: '127.0.0.1:8443', ca_cert_file: ca/ca.crt, ca_key_file: ca/ca.key}\n"
    )
    assert main(["check-config", "--config", str(pki / "config.yaml")], environ={"S": "s"}) == 0
    out = capsys.readouterr().out
    assert f"tls: data port certificate {pki}/server/tls.crt, key {pki}/server/tls.key, client certificates from" in out
    assert f"forward_proxy: 127.0.0.1:8443, CA {pki}/ca/ca.crt, other hosts: refuse" in out
    assert "PRIVATE KEY" not in out and "BEGIN" not in out


CLIENTS = {"billing-sync": {"secret": {"value": "a-local-client-secret-of-32-chars!"}, "tenants": ["*"]}}


def test_client_certificates_count_as_caller_authentication_on_a_non_loopback_data_port(pki):
    files = {"cert_file": str(pki / "server/tls.crt"), "key_file": str(pki / "server/tls.key")}
    with pytest.raises(ConfigError) as caught:
        sim_config(listen="0.0.0.0:8080", tls=files)  # TLS alone authenticates no one
    assert caught.value.problems[0].startswith(
        "listen: 0.0.0.0:8080 is reachable from beyond this host, but no clients"
    )
    config = sim_config(listen="0.0.0.0:8080", tls={**files, "client_ca_file": str(pki / "ca/ca.crt")})
    assert config.tls is not None and config.tls.authenticates_callers
    assert not any("listen" in w for w in config.warnings)


def test_clients_on_a_non_loopback_port_warn_about_clear_text_only_without_tls(pki):
    files = {"cert_file": str(pki / "server/tls.crt"), "key_file": str(pki / "server/tls.key")}
    clear = sim_config(listen="0.0.0.0:8080", clients=CLIENTS)
    assert any("without TLS" in w for w in clear.warnings)
    encrypted = sim_config(listen="0.0.0.0:8080", clients=CLIENTS, tls=files)
    assert not any("without TLS" in w for w in encrypted.warnings)


def test_a_non_loopback_forward_proxy_needs_clients(pki):
    fp = {"listen": "0.0.0.0:8443", "ca_cert_file": str(pki / "ca/ca.crt"), "ca_key_file": str(pki / "ca/ca.key")}
    config = sim_config(forward_proxy=fp, clients=CLIENTS)
    assert config.forward_proxy is not None and config.forward_proxy.listen == Address("0.0.0.0", 8443)
    allowed = sim_config(forward_proxy=fp, security={"allow_unauthenticated": True})
    assert any(w.startswith("forward_proxy.listen: 0.0.0.0:8443") for w in allowed.warnings)


def test_check_config_warns_when_the_forward_proxy_ca_may_not_sign_a_host_it_intercepts(tmp_path, capsys):
    from st_proxy.cli import main

    make_ca(tmp_path / "ca", "api.servicetitan.io", "api-integration.servicetitan.io")
    (tmp_path / "config.yaml").write_text(
        "app_key: {value: k}\n"
        "tenants: {'1': {client_id: c, client_secret: {env: S}}}\n"
        "forward_proxy: {listen: '127.0.0.1:8443', ca_cert_file: ca/ca.crt, ca_key_file: ca/ca.key}\n"
    )
    assert main(["check-config", "--config", str(tmp_path / "config.yaml")], environ={"S": "s"}) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "may not sign" in line]
    assert warnings == [
        "warning: forward_proxy.ca_cert_file: the CA may not sign auth-integration.servicetitan.io, "
        "auth.servicetitan.io (its --permit list): CONNECTs to them will be refused; make the CA with --permit for "
        "every ServiceTitan host the apps call"
    ]


def test_check_config_says_nothing_of_a_ca_that_may_sign_every_intercepted_host(pki, capsys):
    from st_proxy.cli import main

    (pki / "config.yaml").write_text(
        "app_key: {value: k}\n"
        "tenants: {'1': {client_id: c, client_secret: {env: S}}}\n"
        "forward_proxy: {listen: '127.0.0.1:8443', ca_cert_file: ca/ca.crt, ca_key_file: ca/ca.key}\n"
    )
    assert main(["check-config", "--config", str(pki / "config.yaml")], environ={"S": "s"}) == 0
    assert "may not sign" not in capsys.readouterr().err
