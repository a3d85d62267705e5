"""A ServiceTitan look-alike for `st-proxy demo`, `st-proxy simulate` and the tests.

Client-credentials tokens (RFC 6749 section 4.4) carrying `client_id` and `tenant` claims; an API that wants
`ST-App-Key` plus `Authorization` and answers paged lists and RFC 7807-style errors with a `traceId`; special resources
(`echo`, `download`, `redirect`, `setcookie`; their answers live in `simulator_api.py`) for proxy tests; a control API under `/_sim/`. All state lives on a
`Simulator`: tests change its attributes (`token_ttl`, `token_delay`, `api_delay`) or call its controls at any time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from multidict import CIMultiDict

from .simulator_api import DOWNLOAD_PATTERN, FAKE_REDIRECT, answer, is_digits, problem  # noqa: F401 (re-exported)

DEMO_APP_KEY = "ak1.demo-app-key"
DEMO_SCOPE = "tn.crm.customers:r tn.crm.locations:r tn.jpm.jobs:r tn.jpm.jobs:w tn.telecom.calls:r"


@dataclass(frozen=True)
class SimTenant:
    tenant_id: str
    client_id: str
    client_secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not is_digits(self.tenant_id):
            raise ValueError("tenant id must be digits")


DEMO_TENANTS: tuple[SimTenant, ...] = (
    SimTenant("1000001", "cid.demo1", "cs1.demo-secret-1"),
    SimTenant("1000002", "cid.demo2", "cs1.demo-secret-2"),
)

SIMULATOR_KEY: web.AppKey[Simulator] = web.AppKey("simulator")


def parse_tenant_spec(s: str) -> SimTenant:
    """Parse `ID:CLIENT_ID:SECRET` (the secret may itself contain colons). Errors never repeat the input."""
    parts = s.split(":", 2)
    if len(parts) != 3:
        raise ValueError("tenant spec must be ID:CLIENT_ID:SECRET: expected three parts separated by ':'")
    tenant_id, client_id, secret = parts
    for message, failed in (
        ("the tenant id must be digits", not is_digits(tenant_id)),
        ("the client id is empty", not client_id),
        ("the client secret is empty", not secret),
    ):
        if failed:
            raise ValueError(f"tenant spec must be ID:CLIENT_ID:SECRET: {message}")
    return SimTenant(tenant_id, client_id, secret)


def describe(sim: Simulator) -> str:
    """Human text for `st-proxy simulate`: where the simulator listens and its (fake) credentials."""
    base = sim.base_url or "(not started)"
    lines = [
        f"ServiceTitan simulator: {base}",
        f"  token endpoint: {sim.auth_url if sim.base_url else '(not started)'}",
        f"  API base:       {base}",
        f"  app key(s):     {', '.join(sorted(sim.app_keys))}",
        "  tenants:",
    ]
    for t in sim.tenants.values():
        lines.append(f"    {t.tenant_id}  client_id={t.client_id}  client_secret={t.client_secret}")
    return "\n".join(lines)


@dataclass
class _Issued:
    tenant_id: str
    expires_at: float
    revoked: bool = False


@dataclass
class _TokenFailure:
    status: int
    body: dict | str | None
    headers: dict | None
    remaining: int | None  # None: every request until clear_failures()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _oauth_error(error: str, description: str | None = None) -> web.Response:
    # RFC 6749 section 5.2; ServiceTitan answers 400 for these.
    body = {"error": error} if description is None else {"error": error, "error_description": description}
    return web.json_response(body, status=400, headers={"Cache-Control": "no-store"})


def _failure_response(f: _TokenFailure) -> web.Response:
    headers = CIMultiDict(f.headers or {})
    if isinstance(f.body, (dict, list)):
        payload = _json_bytes(f.body)
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(f.body, str):
        payload = f.body.encode()
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    else:
        payload = b""
    return web.Response(status=f.status, body=payload, headers=headers)


class Simulator:
    def __init__(
        self,
        *,
        tenants: Iterable[SimTenant] = DEMO_TENANTS,
        app_keys: Iterable[str] = (DEMO_APP_KEY,),
        token_ttl: float = 900,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenants: dict[str, SimTenant] = {t.tenant_id: t for t in tenants}
        self.app_keys: set[str] = set(app_keys)
        self.token_ttl = token_ttl
        self.token_delay: float = 0
        self.api_delay: float = 0
        self.token_requests = 0
        self.token_requests_by_client: collections.Counter[str] = collections.Counter()
        self.api_requests = 0
        self.issued_tokens: list[str] = []
        self.base_url: str | None = None
        self._clock = clock
        self._signing_key = secrets.token_bytes(32)
        self._issued: dict[str, _Issued] = {}
        self._failure: _TokenFailure | None = None
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # ---- controls -------------------------------------------------------------------------------------------
    @property
    def auth_url(self) -> str:
        return f"{self.base_url}/connect/token"

    def fail_tokens(
        self, status: int, body: dict | str | None = None, *, times: int | None = None, headers: dict | None = None
    ) -> None:
        self._failure = _TokenFailure(status, body, headers, times)

    def clear_failures(self) -> None:
        self._failure = None

    def revoke_tokens(self, tenant_id: str | None = None) -> None:
        for issued in self._issued.values():
            if tenant_id is None or issued.tenant_id == tenant_id:
                issued.revoked = True

    def expire_tokens(self) -> None:
        now = self._clock()
        for issued in self._issued.values():
            issued.expires_at = min(issued.expires_at, now)

    def set_secret(self, tenant_id: str, new_secret: str) -> None:
        old = self.tenants[tenant_id]
        self.tenants[tenant_id] = SimTenant(tenant_id, old.client_id, new_secret)

    def add_tenant(self, t: SimTenant) -> None:
        self.tenants[t.tenant_id] = t

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # A short shutdown timeout: a test that stops mid-download should not wait a minute.
        self._runner = web.AppRunner(self.app, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self.base_url = None

    # ---- wiring ---------------------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application()
        app[SIMULATOR_KEY] = self
        app.router.add_post("/connect/token", self._token)
        # {rest} is empty or starts with "/": /crm/v2/tenant/1/customers and /crm/v2/tenant/1 both match.
        app.router.add_route("*", r"/{module}/v{version:\d+}/tenant/{tenant_id:\d+}{rest:(/.*)?}", self._api)
        app.router.add_get("/_sim/stats", self._sim_stats)
        app.router.add_post("/_sim/fail-tokens", self._sim_fail_tokens)
        app.router.add_post("/_sim/{action:revoke|expire|clear}", self._sim_action)
        return app

    # ---- token endpoint -------------------------------------------------------------------------------------
    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests += 1
        form: dict[str, str] = {}
        if request.content_type == "application/x-www-form-urlencoded":
            form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        client_id, secret, auth_problem = _client_credentials(request, form)
        self.token_requests_by_client[client_id or ""] += 1

        failure = self._take_failure()
        await asyncio.sleep(self.token_delay)
        if failure is not None:
            return _failure_response(failure)

        if request.content_type != "application/x-www-form-urlencoded":
            return _oauth_error("invalid_request", "body must be application/x-www-form-urlencoded")
        if "grant_type" not in form:
            return _oauth_error("invalid_request", "grant_type is required")
        if form["grant_type"] != "client_credentials":
            return _oauth_error("unsupported_grant_type")
        if auth_problem is not None:
            return _oauth_error(*auth_problem)
        tenant = next((t for t in self.tenants.values() if t.client_id == client_id), None)
        # The description names the client id at most, never the secret.
        if tenant is None:
            return _oauth_error("invalid_client", "unknown client")
        if not hmac.compare_digest(tenant.client_secret.encode(), (secret or "").encode()):
            return _oauth_error("invalid_client", "invalid client secret")

        ttl = self.token_ttl
        body = {
            "access_token": self._issue(tenant, ttl),
            "expires_in": int(ttl) if float(ttl).is_integer() else ttl,
            "token_type": "Bearer",
            "scope": DEMO_SCOPE,
        }
        return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})  # RFC 6749 5.1

    def _take_failure(self) -> _TokenFailure | None:
        failure = self._failure
        if failure is not None and failure.remaining is not None:
            failure.remaining -= 1
            if failure.remaining <= 0:
                self._failure = None
            if failure.remaining < 0:  # times=0
                return None
        return failure

    def _issue(self, tenant: SimTenant, ttl: float) -> str:
        now = self._clock()
        claims = {
            "client_id": tenant.client_id,
            "tenant": tenant.tenant_id,
            "iat": int(now),
            "exp": int(now + ttl),
            "jti": f"{len(self.issued_tokens) + 1}-{uuid.uuid4().hex}",
        }
        signing_input = f"{_b64url(_json_bytes({'alg': 'HS256', 'typ': 'JWT'}))}.{_b64url(_json_bytes(claims))}"
        signature = hmac.new(self._signing_key, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{_b64url(signature)}"
        self._issued[token] = _Issued(tenant.tenant_id, now + ttl)
        self.issued_tokens.append(token)
        return token

    # ---- API --------------------------------------------------------------------------------------------------
    async def _api(self, request: web.Request) -> web.StreamResponse:
        self.api_requests += 1
        if request.headers.get("ST-App-Key") not in self.app_keys:
            return problem(401, "Application key not present or invalid.")
        authorization = request.headers.get("Authorization", "")
        token = authorization[7:] if authorization[:7].lower() == "bearer " else authorization
        issued = self._issued.get(token.strip())
        if issued is None or issued.revoked or self._clock() >= issued.expires_at:
            # RFC 6750 section 3: a bare challenge when no token came, else invalid_token (saying why if expired).
            challenge = 'Bearer error="invalid_token"' if authorization else "Bearer"
            if issued is not None and not issued.revoked:
                challenge += ', error_description="The token expired"'
            return problem(401, "Unauthorized", {"WWW-Authenticate": challenge})
        if issued.tenant_id != request.match_info["tenant_id"]:
            return problem(403, "Forbidden")
        await asyncio.sleep(self.api_delay)

        return await answer(request)

    # ---- control API (for `st-proxy simulate` users) --------------------------------------------------------
    async def _sim_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "token_requests": self.token_requests,
                "api_requests": self.api_requests,
                "token_requests_by_client": dict(self.token_requests_by_client),
                "issued_tokens": len(self.issued_tokens),
            }
        )

    async def _sim_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action == "revoke":
            self.revoke_tokens(request.query.get("tenant"))  # ?tenant=ID, else every tenant
        elif action == "expire":
            self.expire_tokens()
        else:
            self.clear_failures()
        return web.json_response({"ok": True})

    async def _sim_fail_tokens(self, request: web.Request) -> web.Response:
        try:
            spec = await request.json()
            status, times = int(spec["status"]), spec.get("times")
            if times is not None:
                times = int(times)
        except (ValueError, KeyError, TypeError):
            return problem(400, 'expected JSON {"status": int, "body": ..., "times": int|null, "headers": {}}')
        self.fail_tokens(status, spec.get("body"), times=times, headers=spec.get("headers"))
        return web.json_response({"ok": True})


def _client_credentials(request: web.Request, form: dict[str, str]) -> tuple[str | None, str | None, tuple | None]:
    """(client_id, secret, oauth error or None) from client_secret_basic or client_secret_post."""
    authorization = request.headers.get("Authorization", "")
    if authorization[:6].lower() != "basic ":
        return form.get("client_id"), form.get("client_secret"), None
    if "client_secret" in form:  # RFC 6749 section 2.3: one authentication method per request
        return form.get("client_id"), None, ("invalid_request", "more than one client authentication method")
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        raw_id, raw_secret = decoded.split(":", 1)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None, ("invalid_client", "malformed Basic authorization")
    # RFC 6749 section 2.3.1: both parts are form-urlencoded before being joined with ":".
    return unquote_plus(raw_id), unquote_plus(raw_secret), None
