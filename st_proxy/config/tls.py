"""The ``tls`` and ``forward_proxy`` sections: TLS on the data port, and the HTTPS_PROXY mode.

Both are off when absent. The files they name are read at every load, like secret files: a config whose certificate
and key do not belong together, or whose CA bundle is not PEM, fails to load (``check-config``, start-up, reload)
with the file's path, and the files are watched, so a renewed certificate is picked up without a restart
(``server/reload.py``). Each check builds a throwaway ``SSLContext``: loading into the live one would replace its
certificate before checking the key (CPython ``SSLContext.load_cert_chain`` -> OpenSSL ``SSL_CTX_use_certificate``
then ``SSL_CTX_use_PrivateKey``), so a mismatched pair would break a running listener.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .problems import Problems, existing_file
from .security import SecurityConfig, exposure
from .values import Address, parse_address

if TYPE_CHECKING:  # model.py imports this module for its section types
    from .model import Config

OTHER_HOSTS = ("refuse", "tunnel")


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: every caller presents a certificate this CA signed (mTLS)

    @property
    def authenticates_callers(self) -> bool:
        """Every connection that gets a request through has presented a certificate the client CA signed."""
        return self.client_ca_file is not None

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None)


@dataclass(frozen=True)
class ForwardProxyConfig:
    listen: Address
    ca_cert_file: Path
    ca_key_file: Path
    other_hosts: str = "refuse"

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.ca_cert_file, self.ca_key_file)


def authenticates_callers(tls: TLSConfig | None) -> bool:
    """For the closed-by-default rule: does TLS itself authenticate every caller of the data port?"""
    return tls is not None and tls.authenticates_callers


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """A fresh server context from the files; ``ssl.SSLError`` / ``OSError`` when they cannot be used.

    With a client CA the context requires a client certificate and allows TLS 1.3 only, without session tickets:
    a resumed session skips the certificate check (RFC 8446 section 2.2), so a caller whose CA was removed could
    otherwise keep coming back on an old session.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=str(tls.client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.num_tickets = 0
        context.options |= ssl.OP_NO_TICKET
    return context


def describe_ssl_error(exc: Exception) -> str:
    """An SSL or file error in words, without anything read from the files."""
    if isinstance(exc, ssl.SSLError):
        # OpenSSL's reason code; CPython leaves it None for some errors ("[SSL] PEM lib"), so the text is the fallback.
        reason = exc.reason or (str(exc.args[1]) if len(exc.args) > 1 else "")
        if "KEY_VALUES_MISMATCH" in reason:
            return "the key does not belong to the certificate"
        if "NO_CERTIFICATE_OR_CRL_FOUND" in reason:
            return "no PEM certificate in it"
        if "PEM" in reason.upper():
            return "not a PEM certificate and key"
        return f"cannot be used ({reason or 'TLS error'})"
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or type(exc).__name__}"
    return "cannot be used"


def _path(problems: Problems, raw: Mapping[Any, Any], section: str, key: str, *, required: bool) -> Path | None:
    value = raw.get(key)
    if value is None:
        if required:
            problems.add(f"{section}.{key}", "is required")
        return None
    if not isinstance(value, str) or not value:
        problems.add(f"{section}.{key}", "expected a file path")
        return None
    try:
        return existing_file(problems.base, value)
    except ValueError as exc:
        problems.add(f"{section}.{key}", str(exc))
        return None


def parse_tls(problems: Problems, raw: object) -> TLSConfig | None:
    if not problems.mapping(raw, "tls"):
        return None
    assert isinstance(raw, Mapping)
    problems.unknown_keys("tls", raw, ("cert_file", "key_file", "client_ca_file"))
    cert = _path(problems, raw, "tls", "cert_file", required=True)
    key = _path(problems, raw, "tls", "key_file", required=True)
    client_ca = _path(problems, raw, "tls", "client_ca_file", required=False)
    if cert is None or key is None or ("client_ca_file" in raw and raw["client_ca_file"] is not None and not client_ca):
        return None
    tls = TLSConfig(cert, key, client_ca)
    try:
        server_context(tls)
    except (ssl.SSLError, OSError) as exc:
        where = "tls.client_ca_file" if client_ca and _is_ca_error(exc) else "tls.cert_file"
        problems.add(where, describe_ssl_error(exc))
        return None
    return tls


def _is_ca_error(exc: Exception) -> bool:
    # load_verify_locations is the last step; it reports a file without certificates this way.
    return "NO_CERTIFICATE_OR_CRL_FOUND" in (getattr(exc, "reason", "") or "")


def parse_forward_proxy(problems: Problems, raw: object) -> ForwardProxyConfig | None:
    if not problems.mapping(raw, "forward_proxy"):
        return None
    assert isinstance(raw, Mapping)
    problems.unknown_keys("forward_proxy", raw, ("listen", "ca_cert_file", "ca_key_file", "other_hosts"))
    listen = None
    if "listen" not in raw:
        problems.add("forward_proxy.listen", "is required")
    else:
        try:
            listen = parse_address(raw["listen"])
        except ValueError as exc:
            problems.add("forward_proxy.listen", str(exc))
    other = raw.get("other_hosts", "refuse")
    if other not in OTHER_HOSTS:
        problems.add("forward_proxy.other_hosts", f"expected one of {', '.join(OTHER_HOSTS)}")
    cert = _path(problems, raw, "forward_proxy", "ca_cert_file", required=True)
    key = _path(problems, raw, "forward_proxy", "ca_key_file", required=True)
    if listen is None or cert is None or key is None or other not in OTHER_HOSTS:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        problems.add("forward_proxy.ca_key_file", describe_ssl_error(exc))
        return None
    return ForwardProxyConfig(listen, cert, key, other)


def parse(problems: Problems, raw: Mapping[Any, Any]) -> dict[str, Any]:
    """The Config fields of both sections, for ``load.from_mapping``."""
    return {
        "tls": parse_tls(problems, raw.get("tls")),
        "forward_proxy": parse_forward_proxy(problems, raw.get("forward_proxy")),
    }


def watched_files(config: Config) -> list[Path]:
    """Certificate, key and CA files to watch like the config file itself."""
    sections = (config.tls, config.forward_proxy)
    return [path for section in sections if section is not None for path in section.files]


def pin_listeners(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with what a reload cannot change taken from ``old``: whether the data port speaks TLS at all and
    whether it requires client certificates (the listener was bound with it), and the forward proxy's listener.
    Certificate, key and CA files (paths and contents) do change."""
    changed: list[str] = []
    tls: TLSConfig | None = new.tls
    if (old.tls is None) != (tls is None):
        changed.append("tls")
        tls = old.tls
    elif old.tls is not None and tls is not None and old.tls.authenticates_callers != tls.authenticates_callers:
        changed.append("tls.client_ca_file (set or unset)")
        tls = old.tls
    forward: ForwardProxyConfig | None = new.forward_proxy
    if (old.forward_proxy is None) != (forward is None):
        changed.append("forward_proxy")
        forward = old.forward_proxy
    elif old.forward_proxy is not None and forward is not None and old.forward_proxy.listen != forward.listen:
        changed.append("forward_proxy.listen")
        forward = replace(forward, listen=old.forward_proxy.listen)
    if changed:
        new = replace(new, tls=tls, forward_proxy=forward)
    return new, changed


def summary_lines(config: Config) -> list[str]:
    """For ``check-config``: what TLS the listeners speak, naming files, never their contents."""
    lines = []
    tls: TLSConfig | None = config.tls
    if tls is not None:
        mtls = f", client certificates from {tls.client_ca_file}" if tls.client_ca_file else ""
        lines.append(f"tls: data port certificate {tls.cert_file}, key {tls.key_file}{mtls}")
    forward: ForwardProxyConfig | None = config.forward_proxy
    if forward is not None:
        lines.append(f"forward_proxy: {forward.listen}, CA {forward.ca_cert_file}, other hosts: {forward.other_hosts}")
    return lines


def forward_proxy_exposure(
    forward: ForwardProxyConfig | None, *, clients: int, security: SecurityConfig
) -> tuple[list[str], list[str]]:
    """The closed-by-default rule for the forward-proxy listener: the requests in its tunnels act with the tenants'
    credentials like the data port's, and client certificates play no part there (the app's TLS ends at the leaf
    the proxy signs), so beyond loopback it needs clients, or ``security.allow_unauthenticated``."""
    if forward is None:
        return [], []
    refused, warned = exposure(forward.listen, clients=clients, client_certificates=False, security=security, tls=True)
    return [f"forward_proxy.{line}" for line in refused], [f"forward_proxy.{line}" for line in warned]
