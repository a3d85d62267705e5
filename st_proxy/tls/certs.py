"""A local certificate authority: made once by ``st-proxy certs init``, then signing server and client certificates.

Keys are ECDSA P-256: every TLS stack in use accepts them, and a key takes well under a millisecond to make, which
matters for the forward-proxy mode that signs a certificate per ServiceTitan host on the fly (``leaves.py``).

Name constraints (RFC 5280 section 4.2.1.10): a CA made with ``permit`` carries a critical NameConstraints extension,
so a certificate it signs for any other name fails verification in every client that trusts the CA, even when the key
is stolen. Constraints only bind the name types they list, so the CA always constrains both kinds a TLS client checks:
DNS names, and IP addresses (with no IP address permitted, the whole IPv4 and IPv6 space is excluded; with no DNS name
permitted, only the reserved ``invalid`` domain of RFC 6761 is, so no real name is).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .validity import CA_DAYS, LEAF_DAYS

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "tls.crt", "tls.key"
BACKDATE = datetime.timedelta(hours=1)  # a client whose clock runs a little behind still accepts a fresh certificate
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CertError(Exception):
    """A name, file or key that cannot be used; the message fits after ``st-proxy: `` and names no key material."""


def parse_name(text: str) -> str | IPAddress:
    """A host name (lower-cased) or an IP address, as a certificate's subject alternative names hold them."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    name = text.lower()
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        raise CertError(f"{text!r} is neither a host name (letters, digits, '-', dots) nor an IP address")
    return name


def parse_permit(text: str) -> str | IPNetwork:
    """A DNS name (it permits itself and every name under it) or an IP network (``10.0.0.0/8``; an address is a /32)."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        if "/" in text or text.replace(".", "").isdigit():
            raise CertError(f"{text!r} is not a valid IP network (write 10.0.0.0/8 or one address)") from None
    name = parse_name(text)
    assert isinstance(name, str)
    return name


def permits(name: str | IPAddress, permitted: Sequence[str | IPNetwork]) -> bool:
    """Would a CA constrained to ``permitted`` be allowed to sign ``name`` (RFC 5280 section 4.2.1.10 matching)?"""
    if isinstance(name, str):
        return any(isinstance(p, str) and (name == p or name.endswith("." + p)) for p in permitted)
    return any(not isinstance(p, str) and name.version == p.version and name in p for p in permitted)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _general_name(name: str | IPAddress) -> x509.GeneralName:
    return x509.DNSName(name) if isinstance(name, str) else x509.IPAddress(name)


def _name_constraints(permitted: Sequence[str | IPNetwork]) -> x509.NameConstraints:
    subtrees: list[x509.GeneralName] = [x509.DNSName(p) if isinstance(p, str) else x509.IPAddress(p) for p in permitted]
    excluded: list[x509.GeneralName] = []
    if not any(isinstance(p, str) for p in permitted):
        subtrees.append(x509.DNSName("invalid"))  # RFC 6761: never a real name, so no real name is permitted
    if not any(not isinstance(p, str) for p in permitted):
        excluded = [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))]
    return x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=excluded or None)


@dataclass(frozen=True)
class LocalCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        *,
        permit: Sequence[str] = (),
        common_name: str = "st-proxy local CA",
        days: int = CA_DAYS,
        now: datetime.datetime | None = None,
    ) -> LocalCA:
        permitted = [parse_permit(p) for p in permit]
        key = ec.generate_private_key(ec.SECP256R1())
        now = now or _now()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            # path_length=0: it signs end-entity certificates only, never another CA that would escape its constraints.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if permitted:
            builder = builder.add_extension(_name_constraints(permitted), critical=True)
        return cls(builder.sign(key, hashes.SHA256()), key)

    @classmethod
    def load(cls, cert_file: str | Path, key_file: str | Path) -> LocalCA:
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        except OSError as exc:
            raise CertError(f"{cert_file}: cannot be read: {exc.strerror or type(exc).__name__}") from None
        except ValueError:
            raise CertError(f"{cert_file}: not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        except OSError as exc:
            raise CertError(f"{key_file}: cannot be read: {exc.strerror or type(exc).__name__}") from None
        except (ValueError, TypeError):  # the message is never shown: it could quote key material
            raise CertError(f"{key_file}: not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{key_file}: expected an EC private key (made by st-proxy certs init)")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CertError(f"{key_file}: this key does not belong to the certificate {cert_file}")
        try:
            if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise CertError(f"{cert_file}: not a CA certificate")
        except x509.ExtensionNotFound:
            raise CertError(f"{cert_file}: not a CA certificate (no basic constraints)") from None
        return cls(cert, key)

    @classmethod
    def load_dir(cls, directory: str | Path) -> LocalCA:
        return cls.load(Path(directory) / CA_CERT, Path(directory) / CA_KEY)

    @property
    def permitted(self) -> list[str | IPNetwork] | None:
        """The names this CA may sign (None: unconstrained)."""
        try:
            constraints = self.cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            return None
        names: list[str | IPNetwork] = []
        for general in constraints.permitted_subtrees or ():
            value = general.value
            if isinstance(value, IPNetwork) or (isinstance(general, x509.DNSName) and value != "invalid"):
                names.append(value)
        return names

    def issue(
        self,
        names: Sequence[str],
        *,
        client: bool = False,
        days: int = LEAF_DAYS,
        now: datetime.datetime | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A server certificate for ``names`` (host names or IP addresses), or with ``client`` a client certificate
        whose subject common name is ``names[0]`` (for mTLS)."""
        if not names:
            raise CertError("at least one name is needed")
        parsed = [parse_name(n) for n in names]
        permitted = self.permitted
        if permitted is not None:
            outside = [str(n) for n in parsed if not permits(n, permitted)]
            if outside:
                allowed = ", ".join(str(p) for p in permitted) or "(none)"
                raise CertError(f"this CA may only sign names under: {allowed}; not {', '.join(outside)}")
        key = ec.generate_private_key(ec.SECP256R1())
        now = now or _now()
        not_after = min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        # Clients match the subject alternative names; the common name is a label. An IP address there would be
        # read as a DNS name by OpenSSL's name-constraint check (and fail a CA that permits only that address).
        dns = [n for n in parsed if isinstance(n, str)]
        common_name = str(parsed[0]) if client else (dns[0] if dns else "st-proxy server")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in parsed]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        return builder.sign(self.key, hashes.SHA256()), key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Replace ``path`` atomically (a watcher never reads half a file), mode 0600 for a key, else 0644.

    The temporary file is created with its final mode, so a key is never readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_ca(ca: LocalCA, out: Path) -> tuple[Path, Path]:
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing:
        # A new CA would silently orphan every certificate and trust store made from the old one.
        raise CertError(f"{existing[0]} already exists; remove it first to make a new CA")
    write_file(key_path, key_pem(ca.key), private=True)
    write_file(cert_path, cert_pem(ca.cert), private=False)
    return cert_path, key_path


def write_pair(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    out: Path,
    names: tuple[str, str] = (SERVER_CERT, SERVER_KEY),
) -> tuple[Path, Path]:
    """Write (or renew in place) a certificate and its key: the key first, so a watcher that looks between the two
    sees a mismatched pair at worst, which it refuses while it keeps serving the old one."""
    cert_path, key_path = out / names[0], out / names[1]
    write_file(key_path, key_pem(key), private=True)
    write_file(cert_path, cert_pem(cert), private=False)
    return cert_path, key_path
