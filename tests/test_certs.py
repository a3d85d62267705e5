"""`st-proxy certs init / issue`: a local CA whose certificates verify in real TLS handshakes on loopback, and whose
name constraints make a certificate for any other name fail verification, even one signed with the stolen key."""

from __future__ import annotations

import datetime
import ssl
import stat

import pytest
from cryptography import x509
from tls_helpers import bare_tls_server, client_context, handshake, issue, issue_client, make_ca

from st_proxy.cli import main
from st_proxy.tls.certs import LocalCA, write_pair


class StolenKey(LocalCA):
    """Someone who copied ca.key signs whatever they like: the command's own check is not in their way."""

    @property
    def permitted(self):
        return None


async def test_a_server_certificate_verifies_for_its_names_in_a_real_handshake(tmp_path):
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "server", "localhost", "127.0.0.1")
    async with bare_tls_server(server / "tls.crt", server / "tls.key") as port:
        assert await handshake(port, client_context(ca / "ca.crt"), "localhost") == b"ok"
        assert await handshake(port, client_context(ca / "ca.crt"), "127.0.0.1") == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            await handshake(port, client_context(ca / "ca.crt"), "other.example")


async def test_a_client_that_does_not_trust_the_ca_refuses_its_certificate(tmp_path):
    ca = make_ca(tmp_path / "ca")
    other = make_ca(tmp_path / "other")
    server = issue(ca, tmp_path / "server", "localhost")
    async with bare_tls_server(server / "tls.crt", server / "tls.key") as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            await handshake(port, client_context(other / "ca.crt"), "localhost")


def test_the_ca_key_and_server_key_are_readable_by_their_owner_only(tmp_path):
    ca = make_ca(tmp_path / "ca")
    server = issue(ca, tmp_path / "server", "localhost")
    for key in (ca / "ca.key", server / "tls.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((ca / "ca.crt").stat().st_mode) == 0o644
    cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    with pytest.raises(x509.ExtensionNotFound):  # no --permit: unconstrained (the docs say what that means)
        cert.extensions.get_extension_for_class(x509.NameConstraints)


def test_permit_puts_critical_name_constraints_on_the_ca(tmp_path):
    ca = make_ca(tmp_path / "ca", "auth.servicetitan.io", "api.servicetitan.io")
    cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert [n.value for n in ext.value.permitted_subtrees] == ["auth.servicetitan.io", "api.servicetitan.io"]
    # Constraints bind only the name types they list: with no IP permitted, every IP address is excluded.
    assert {str(n.value) for n in ext.value.excluded_subtrees} == {"0.0.0.0/0", "::/0"}


async def test_a_certificate_signed_with_a_stolen_permitted_ca_key_for_another_name_fails_verification(tmp_path):
    ca_dir = make_ca(tmp_path / "ca", "localhost")
    thief = StolenKey.load_dir(ca_dir)
    # The same key, the same chain: only the name differs. Verification refuses it for the name outside --permit.
    for name, connect_as in (("evil.localhost.example", "evil.localhost.example"), ("127.0.0.1", "127.0.0.1")):
        write_pair(*thief.issue([name]), tmp_path / name)
        async with bare_tls_server(tmp_path / name / "tls.crt", tmp_path / name / "tls.key") as port:
            with pytest.raises(ssl.SSLCertVerificationError, match=r"permitted subtree violation|excluded subtree"):
                await handshake(port, client_context(ca_dir / "ca.crt"), connect_as)
    # A name under a permitted one is within the constraint (RFC 5280 section 4.2.1.10) and verifies.
    write_pair(*thief.issue(["a.localhost"]), tmp_path / "inside")
    async with bare_tls_server(tmp_path / "inside" / "tls.crt", tmp_path / "inside" / "tls.key") as port:
        assert await handshake(port, client_context(ca_dir / "ca.crt"), "a.localhost") == b"ok"


async def test_a_ca_permitted_only_an_ip_address_cannot_vouch_for_any_host_name(tmp_path):
    ca_dir = make_ca(tmp_path / "ca", "127.0.0.1")
    thief = StolenKey.load_dir(ca_dir)
    write_pair(*thief.issue(["localhost"]), tmp_path / "named")
    async with bare_tls_server(tmp_path / "named" / "tls.crt", tmp_path / "named" / "tls.key") as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
            await handshake(port, client_context(ca_dir / "ca.crt"), "localhost")
    server = issue(ca_dir, tmp_path / "ok", "127.0.0.1")
    async with bare_tls_server(server / "tls.crt", server / "tls.key") as port:
        assert await handshake(port, client_context(ca_dir / "ca.crt"), "127.0.0.1") == b"ok"


def test_issue_refuses_a_name_outside_the_permitted_ones(tmp_path, capsys):
    ca = make_ca(tmp_path / "ca", "servicetitan.io")
    out = tmp_path / "x"
    code = main(
        ["certs", "issue", "--ca", str(ca), "--host", "api.servicetitan.io", "--host", "example.com", "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "may only sign names under: servicetitan.io; not example.com" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["issue", "--ca", "{tmp}/missing", "--host", "a", "--out", "{tmp}/o"], "ca.crt: cannot be read"),
        (["issue", "--ca", "{tmp}/ca", "--out", "{tmp}/o"], "name at least one --host"),
        (["issue", "--ca", "{tmp}/ca", "--host", "bad host", "--out", "{tmp}/o"], "neither a host name"),
        (["issue", "--ca", "{tmp}/ca", "--host", "a", "--client", "b", "--out", "{tmp}/o"], "not both"),
        (["init", "--out", "{tmp}/ca"], "ca.crt already exists; remove it first"),
        (["init", "--out", "{tmp}/n", "--permit", "10.0.0.1/8"], "not a valid IP network"),
        (["init", "--out", "{tmp}/n", "--days", "0"], "--days must be at least 1"),
    ],
)
def test_certs_errors_exit_2_with_one_clear_line(tmp_path, capsys, args, message):
    make_ca(tmp_path / "ca")
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["certs", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before  # nothing was overwritten
    assert "PRIVATE KEY" not in err


def test_a_key_that_does_not_belong_to_the_ca_certificate_is_refused(tmp_path, capsys):
    ca = make_ca(tmp_path / "ca")
    other = make_ca(tmp_path / "other")
    (ca / "ca.key").write_bytes((other / "ca.key").read_bytes())
    assert main(["certs", "issue", "--ca", str(ca), "--host", "a", "--out", str(tmp_path / "o")]) == 2
    assert "does not belong to the certificate" in capsys.readouterr().err


def test_a_client_certificate_is_for_client_authentication_only(tmp_path):
    ca = make_ca(tmp_path / "ca")
    cert_path, key_path = issue_client(ca, tmp_path / "client", "billing-sync")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.rfc4514_string() == "CN=billing-sync"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_a_server_certificate_never_outlives_its_ca(tmp_path):
    ca = LocalCA.create(days=10)
    cert, _ = ca.issue(["localhost"], days=400)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)
