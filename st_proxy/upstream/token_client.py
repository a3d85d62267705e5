"""One OAuth 2.0 client-credentials request (RFC 6749 section 4.4), and nothing else.

Fetching a token and reusing one are two objects (golang.org/x/oauth2): this module does the request and classifies
what went wrong; ``tokens.py`` decides when to call it. Errors keep the RFC 6749 section 5.2 ``error`` code; no message
built here carries the client secret or a token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import quote_plus

import aiohttp
from yarl import URL

from ..config import Tenant
from .egress import DIRECT

DEFAULT_LIFETIME = 900.0  # ServiceTitan's usual lifetime, used when the answer says nothing (docs/servicetitan.md)
# RFC 6749 section 5.2 codes that mean the credentials themselves are wrong: retrying soon cannot help.
REJECTED_CODES = frozenset({"invalid_client", "unauthorized_client", "invalid_grant"})
# The ``error`` code is shown to callers (token_rejected detail) and in /tenants: keep it to a plain token. RFC 6749
# section 5.2 codes are lower-case words joined by "_"; anything else is replaced by the HTTP status.
ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Visible ASCII only (RFC 6750 section 2.1 b64token is a subset): a space, CR or LF could split the Authorization header.
ACCESS_TOKEN = re.compile(r"[\x21-\x7e]+")
MAX_ANSWER_BYTES = 1 << 20  # a token answer is a few KiB; a bigger one is not a token answer


@dataclass(frozen=True, eq=False)  # eq=False: tokens compare by identity (docs/tokens.md, "Upstream 401")
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
    if value.isascii() and value.isdigit():  # str.isdigit alone accepts "²"
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
    if not ACCESS_TOKEN.fullmatch(access_token):
        raise TokenRequestFailed(
            "invalid_response", "access_token has characters a header cannot carry", rejected=False
        )
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
    if not math.isfinite(lifetime):
        raise TokenRequestFailed("invalid_response", "expires_in is not a finite number", rejected=False)
    if lifetime <= 0:
        raise TokenRequestFailed("invalid_response", "token is already expired", rejected=False)
    return Token(access_token, now, now + lifetime)


def _error_from_answer(status: int, body: bytes, retry_after: float | None) -> TokenRequestFailed:
    code, description = f"http_{status}", f"token endpoint answered {status}"
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str) and ERROR_CODE.fullmatch(data["error"]):
        code = data["error"]
        desc = data.get("error_description")
        description = (
            f"{description} ({code})" if not isinstance(desc, str) else f"{description} ({code}: {desc[:200]})"
        )
    # 429 and 5xx are the endpoint's own trouble, whatever the body says (docs/servicetitan.md). A 400/401, or an
    # RFC 6749 section 5.2 code naming the credentials, is the endpoint judging them: asking again soon cannot help.
    transient = status == 429 or status >= 500
    rejected = not transient and (code in REJECTED_CODES or status in (400, 401))
    return TokenRequestFailed(code, description, rejected=rejected, retry_after=retry_after)


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    """The answer body, or invalid_response when it is larger than any token answer could be."""
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise TokenRequestFailed("invalid_response", "token answer is too large", rejected=False)
    return bytes(body)


class TokenClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_auth: str = "client_secret_post",
        scope: str | None = None,
        clock: Callable[[], float] = time.time,
        egress: Callable[[str], URL | None] = lambda url: DIRECT,
    ) -> None:
        self._session = session
        self._egress = egress
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
            if secret and (secret in exc.description or secret in exc.code):
                exc.code = exc.code.replace(secret, "<redacted>")
                exc.description = exc.description.replace(secret, "<redacted>")
                exc.args = (f"{exc.code}: {exc.description}",)
            raise

    async def _request(self, tenant: Tenant, form: dict[str, str], headers: dict[str, str]) -> Token:
        proxy = self._egress(tenant.environment.auth_url)
        try:
            async with self._session.post(
                tenant.environment.auth_url, data=form, headers=headers, allow_redirects=False, proxy=proxy
            ) as resp:
                body = await _read_limited(resp)
                now = self._clock()
                if resp.status != 200:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), now)
                    raise _error_from_answer(resp.status, body, retry_after)
                return parse_token_answer(body, now)
        except TimeoutError:
            raise TokenRequestFailed("timeout", "token endpoint did not answer in time", rejected=False) from None
        except aiohttp.ClientConnectionError as exc:
            raise TokenRequestFailed(
                "connect_error", f"token endpoint unreachable ({type(exc).__name__})", rejected=False
            ) from None
        except aiohttp.ClientError as exc:
            raise TokenRequestFailed(
                "http_error", f"token request failed ({type(exc).__name__})", rejected=False
            ) from None
