"""One OAuth 2.0 client-credentials request (RFC 6749 section 4.4), and nothing else.

Fetching a token and reusing one are two objects (golang.org/x/oauth2): this module does the request and classifies
what went wrong; ``tokens.py`` decides when to call it. Errors keep the RFC 6749 section 5.2 ``error`` code; no message
built here carries the client secret or a token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import quote_plus

import aiohttp

from .config import Tenant

DEFAULT_LIFETIME = 900.0  # ServiceTitan's documented lifetime, used when the answer says nothing (servicetitan.md)
# RFC 6749 section 5.2 codes that mean the credentials themselves are wrong: retrying soon cannot help.
REJECTED_CODES = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})


@dataclass(frozen=True, eq=False)  # eq=False: tokens compare by identity (design.md section 2, 401 replay)
class Token:
    access_token: str = field(repr=False)
    issued_at: float
    expires_at: float

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    def __repr__(self) -> str:
        return f"Token(<redacted>, expires_at={self.expires_at:.0f})"


class TokenRequestFailed(Exception):
    """The token endpoint did not give a token. ``rejected`` means the credentials were refused."""

    def __init__(self, code: str, description: str, *, rejected: bool, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
        self.rejected = rejected
        self.retry_after = retry_after


def basic_credentials(client_id: str, client_secret: str) -> str:
    """RFC 6749 section 2.3.1: each part form-urlencoded before the Basic encoding."""
    raw = f"{quote_plus(client_id)}:{quote_plus(client_secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """RFC 9110 section 10.2.3: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def jwt_expiry(access_token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying: only used when the answer lacks ``expires_in``."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def parse_token_answer(body: bytes, now: float) -> Token:
    try:
        data = json.loads(body)
    except ValueError:
        raise TokenRequestFailed("invalid_response", "token answer is not JSON", rejected=False) from None
    if not isinstance(data, dict):
        raise TokenRequestFailed("invalid_response", "token answer is not a JSON object", rejected=False)
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise TokenRequestFailed("invalid_response", "token answer has no access_token", rejected=False)
    expires_in = data.get("expires_in")
    lifetime: float | None = None
    if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool):
        lifetime = float(expires_in)
    elif isinstance(expires_in, str):
        try:
            lifetime = float(expires_in)
        except ValueError:
            raise TokenRequestFailed("invalid_response", "expires_in is not a number", rejected=False) from None
    elif expires_in is not None:
        raise TokenRequestFailed("invalid_response", "expires_in is not a number", rejected=False)
    if lifetime is None:
        exp = jwt_expiry(access_token)
        lifetime = exp - now if exp is not None else DEFAULT_LIFETIME
    if not lifetime > 0:
        raise TokenRequestFailed("invalid_response", "token is already expired", rejected=False)
    return Token(access_token, now, now + lifetime)


def _error_from_answer(status: int, body: bytes, retry_after: float | None) -> TokenRequestFailed:
    code, description = f"http_{status}", f"token endpoint answered {status}"
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"].isascii():
        code = data["error"][:64]
        desc = data.get("error_description")
        description = f"{description} ({code})" if not isinstance(desc, str) else f"{description} ({code}: {desc[:200]})"
    # A 400/401 is the endpoint judging the credentials (RFC 6749 section 5.2); 429 and 5xx are its own trouble.
    rejected = code in REJECTED_CODES or status in (400, 401)
    return TokenRequestFailed(code, description, rejected=rejected, retry_after=retry_after)


class TokenClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_auth: str = "client_secret_post",
        scope: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._client_auth = client_auth
        self._scope = scope
        self._clock = clock

    async def fetch(self, tenant: Tenant) -> Token:
        secret = tenant.client_secret.reveal()
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        if self._client_auth == "client_secret_basic":
            headers["Authorization"] = basic_credentials(tenant.client_id, secret)
        else:
            form.update(client_id=tenant.client_id, client_secret=secret)
        if self._scope:
            form["scope"] = self._scope
        try:
            return await self._request(tenant, form, headers)
        except TokenRequestFailed as exc:
            # A misbehaving endpoint could echo the form back; the secret must not ride along into a log line.
            if secret in exc.description:
                exc.description = exc.description.replace(secret, "<redacted>")
                exc.args = (f"{exc.code}: {exc.description}",)
            raise

    async def _request(self, tenant: Tenant, form: dict[str, str], headers: dict[str, str]) -> Token:
        try:
            async with self._session.post(tenant.environment.auth_url, data=form, headers=headers,
                                          allow_redirects=False) as resp:
                body = await resp.read()
                now = self._clock()
                if resp.status != 200:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), now)
                    raise _error_from_answer(resp.status, body, retry_after)
                return parse_token_answer(body, now)
        except asyncio.TimeoutError:
            raise TokenRequestFailed("timeout", "token endpoint did not answer in time", rejected=False) from None
        except aiohttp.ClientConnectionError as exc:
            raise TokenRequestFailed("connect_error", f"token endpoint unreachable ({type(exc).__name__})",
                                     rejected=False) from None
        except aiohttp.ClientError as exc:
            raise TokenRequestFailed("http_error", f"token request failed ({type(exc).__name__})",
                                     rejected=False) from None
