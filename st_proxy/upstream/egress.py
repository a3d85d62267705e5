"""Where outbound connections go: the HTTP(S) proxy, if any, for a token endpoint or API base.

``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` are honoured for token and API calls alike (docs/configuration.md). They are
looked up once per base URL, not per request: aiohttp's own ``trust_env=True`` repeats the lookup on every request and
reads ``~/.netrc`` in a worker thread each time, which cut the proxy's throughput to less than a third
(`bench/run.py throughput`: 1,780 req/s with it, 5,900 without). The environment is read by the caller (``app.py``) and
passed in, so nothing below ``app.py`` reads it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # public, not in typeshed

from yarl import URL

from ..config import Address

DIRECT = None  # no proxy: connect straight to the host


class EgressProxies:
    def __init__(self, environ: Mapping[str, str]) -> None:
        # Lower-case names win over upper-case ones, as in curl and urllib (urllib.request.getproxies_environment).
        self._env = {k.lower(): v for k, v in environ.items() if k.isupper() and v}
        self._env.update({k: v for k, v in environ.items() if k.islower() and v})
        self._routes: dict[str, URL | None] = {}

    def __call__(self, base_url: str) -> URL | None:
        """The proxy to send requests for ``base_url`` through, or None (DIRECT)."""
        if base_url not in self._routes:
            self._routes[base_url] = self._lookup(base_url)
        return self._routes[base_url]

    def _lookup(self, base_url: str) -> URL | None:
        parts = urlsplit(base_url)
        proxy = self._env.get(f"{parts.scheme}_proxy") or self._env.get("all_proxy")
        if not proxy or not parts.hostname:
            return DIRECT
        no_proxy = self._env.get("no_proxy", "")
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        if no_proxy and proxy_bypass_environment(host, {"no": no_proxy}):
            return DIRECT
        # Credentials in the proxy URL stay there: aiohttp turns them into Proxy-Authorization (RFC 9110 section 11.7.2)
        # both for a CONNECT tunnel (https targets) and for a plain request through the proxy (http targets).
        return URL(proxy if "://" in proxy else f"http://{proxy}")


_PROXY_VARIABLES = ("https_proxy", "http_proxy", "all_proxy")


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loops_into(environ: Mapping[str, str], listeners: Mapping[str, Address]) -> list[str]:
    """Problems, one per proxy variable of this process that points at one of the proxy's own listeners.

    The proxy's calls to ServiceTitan would go through itself: with the forward-proxy mode, a ``CONNECT`` to
    ServiceTitan would be intercepted and served by the proxy, calling itself again (docs/tls.md). Hosts are
    compared without resolving names: loopback names and addresses match loopback and wildcard listeners.
    """
    problems = []
    for name, value in environ.items():
        if name.lower() not in _PROXY_VARIABLES or not value:
            continue
        parts = urlsplit(value if "://" in value else f"http://{value}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            continue
        host = (parts.hostname or "").lower()
        for what, address in listeners.items():
            if address.port != port or port == 0:
                continue
            listener = address.host.lower()
            if host == listener or (_is_local(host) and (_is_local(listener) or listener in ("0.0.0.0", "::"))):
                # Only host and port are shown: the variable's value may carry proxy credentials.
                problems.append(
                    f"env.{name}: points at this proxy's own {what} {address}; its calls to ServiceTitan would "
                    f"loop into itself. Set {name} for the app only, not for st-proxy"
                )
    return problems
