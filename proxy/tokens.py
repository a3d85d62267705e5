"""TokenManager: when to fetch a tenant's token, and when to reuse it (design.md section 2).

- One entry per credentials key (auth URL, tenant, client id, secret fingerprint): a rotated secret never reuses a
  token minted from the old one.
- A token is sent only while ``now < expires_at - skew``. Inside the refresh window one background refresh starts and
  callers keep the current token. For short-lived tokens the window is capped at half the lifetime and the skew at a
  quarter, so a 6 s token is still used and refreshed in time.
- Single flight: one fetch per entry at a time, run as its own task with its own timeout. Callers wait on it through
  ``asyncio.shield``, so a caller that disconnects cancels only its own wait, never the fetch the others share.
- Failures are classified by ``token_client``. Rejected credentials: the entry answers ``token_rejected`` at once and
  asks again after the cool-off. Transient failures: exponential backoff (1 s doubling to 60 s, each delay drawn
  between half and all of its step, or the server's ``Retry-After`` when longer); meanwhile callers get
  ``token_unavailable`` without a new request. A still-valid token is served through both. Retries are lazy: the
  first request after the delay starts the next attempt, so nothing ever stops retrying and an idle tenant costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .config import Tenant, TokenConfig
from .errors import TokenRejected, TokenUnavailable
from .token_client import Token, TokenRequestFailed

log = logging.getLogger("st_proxy.tokens")

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


class Fetcher(Protocol):
    async def fetch(self, tenant: Tenant) -> Token: ...


class TokenObserver(Protocol):
    def token_fetched(self, tenant_id: str, outcome: str, seconds: float) -> None: ...


@dataclass(eq=False)
class TokenEntry:
    tenant: Tenant
    token: Token | None = None
    flight: asyncio.Task[Token] | None = None
    rejected: bool = False
    failures: int = 0  # consecutive transient failures
    retry_at: float = 0.0  # no new fetch before this time
    last_fetch: float | None = None
    last_error: str | None = None
    replays: int = 0
    attempted: asyncio.Event = field(default_factory=asyncio.Event)  # the first attempt has finished

    def state(self, now: float, skew: float) -> str:
        if self.flight is not None:
            return "refreshing"
        if self.rejected:
            return "rejected"
        if self.failures:
            return "backing_off"
        if self.token is not None and now < self.token.expires_at - skew:
            return "valid"
        return "none"


def _capped(token: Token, configured: float, fraction: float) -> float:
    return min(configured, token.lifetime * fraction)


class TokenManager:
    def __init__(
        self,
        fetcher: Fetcher,
        settings: TokenConfig,
        *,
        clock: Callable[[], float] = time.time,
        observer: TokenObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._fetcher = fetcher
        self.settings = settings
        self._clock = clock
        self._observer = observer
        self._rng = rng or random.Random()
        self._entries: dict[tuple[str, str, str, str], TokenEntry] = {}

    # -- reading ------------------------------------------------------------------------------------------------
    def entry(self, tenant: Tenant) -> TokenEntry:
        key = tenant.credentials_key()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = TokenEntry(tenant)
        return entry

    def skew(self, token: Token) -> float:
        return _capped(token, self.settings.expiry_skew_seconds, 0.25)

    def usable(self, token: Token | None, now: float) -> bool:
        return token is not None and now < token.expires_at - self.skew(token)

    def refresh_due(self, token: Token, now: float) -> bool:
        return now >= token.expires_at - _capped(token, self.settings.refresh_ahead_seconds, 0.5)

    # -- the request path ---------------------------------------------------------------------------------------
    async def get(self, tenant: Tenant) -> Token:
        """A token fit to send now, or TokenRejected / TokenUnavailable."""
        entry = self.entry(tenant)
        now = self._clock()
        token = entry.token
        if self.usable(token, now):
            assert token is not None
            if self.refresh_due(token, now) and entry.flight is None and now >= entry.retry_at:
                self._start(entry)
            return token
        if entry.flight is None:
            if now < entry.retry_at:
                raise self._refusal(entry, now)
            self._start(entry)
        assert entry.flight is not None
        try:
            return await asyncio.shield(entry.flight)
        except TokenRequestFailed:
            raise self._refusal(entry, self._clock()) from None

    def invalidate(self, tenant: Tenant, token: Token) -> bool:
        """Drop ``token`` if it is still the current one (by identity): an upstream 401 said it no longer works."""
        entry = self._entries.get(tenant.credentials_key())
        if entry is None or entry.token is not token:
            return False
        entry.token = None
        return True

    def _refusal(self, entry: TokenEntry, now: float) -> TokenRejected | TokenUnavailable:
        tenant_id = entry.tenant.tenant_id
        wait = max(0.0, entry.retry_at - now)
        if entry.rejected:
            return TokenRejected(
                f"the token endpoint refused the tenant's credentials ({entry.last_error})", tenant=tenant_id
            )
        return TokenUnavailable(
            f"no token for the tenant: the token endpoint is failing ({entry.last_error})",
            tenant=tenant_id,
            retry_after=wait or BACKOFF_FIRST,
        )

    # -- the single flight --------------------------------------------------------------------------------------
    def _start(self, entry: TokenEntry) -> None:
        entry.flight = asyncio.get_running_loop().create_task(
            self._fetch(entry), name=f"token-fetch-{entry.tenant.tenant_id}"
        )
        # Retrieve the exception even when no caller is waiting (a background refresh), so asyncio stays quiet.
        entry.flight.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _fetch(self, entry: TokenEntry) -> Token:
        tenant_id = entry.tenant.tenant_id
        started = time.perf_counter()
        try:
            token = await asyncio.wait_for(
                self._fetcher.fetch(entry.tenant), timeout=self.settings.fetch_timeout_seconds
            )
        except (TokenRequestFailed, asyncio.TimeoutError) as exc:
            failure = exc if isinstance(exc, TokenRequestFailed) else TokenRequestFailed(
                "timeout", "token request took longer than tokens.fetch_timeout_seconds", rejected=False
            )
            self._failed(entry, failure)
            self._observe(tenant_id, "rejected" if failure.rejected else "error", started)
            raise failure from None
        finally:
            entry.flight = None
            entry.last_fetch = self._clock()
            entry.attempted.set()
        if entry.failures or entry.rejected:
            log.info("tenant %s: token fetch recovered", tenant_id, extra={"event": "token_recovered", "tenant": tenant_id})
        entry.token, entry.rejected, entry.failures, entry.retry_at, entry.last_error = token, False, 0, 0.0, None
        self._observe(tenant_id, "success", started)
        return token

    def _failed(self, entry: TokenEntry, failure: TokenRequestFailed) -> None:
        now = self._clock()
        tenant_id = entry.tenant.tenant_id
        changed = entry.last_error != failure.code or entry.rejected != failure.rejected
        entry.last_error = failure.code
        if failure.rejected:
            entry.rejected, entry.failures = True, 0
            entry.retry_at = now + self.settings.rejected_cooloff_seconds
            if changed:
                log.warning(
                    "tenant %s: token endpoint rejected the credentials (%s); next attempt in %ss",
                    tenant_id, failure.code, self.settings.rejected_cooloff_seconds,
                    extra={"event": "token_rejected", "tenant": tenant_id, "error": failure.code},
                )
            return
        entry.rejected = False
        entry.failures += 1
        step = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (entry.failures - 1))
        delay = self._rng.uniform(step / 2, step)
        if failure.retry_after is not None and failure.retry_after > delay:
            delay = failure.retry_after
        entry.retry_at = now + delay
        if changed:
            log.warning(
                "tenant %s: token fetch failed (%s); backing off",
                tenant_id, failure.code,
                extra={"event": "token_backing_off", "tenant": tenant_id, "error": failure.code},
            )

    def _observe(self, tenant_id: str, outcome: str, started: float) -> None:
        if self._observer is not None:
            self._observer.token_fetched(tenant_id, outcome, time.perf_counter() - started)

    # -- start-up and reload ------------------------------------------------------------------------------------
    async def prewarm(self, tenants: Iterable[Tenant]) -> None:
        """Fetch every tenant's first token, a bounded number at a time; failures are recorded, not raised."""
        limit = asyncio.Semaphore(self.settings.prewarm_concurrency)

        async def one(tenant: Tenant) -> None:
            async with limit:
                try:
                    await self.get(tenant)
                except (TokenRejected, TokenUnavailable):
                    pass
                finally:
                    self.entry(tenant).attempted.set()

        await asyncio.gather(*(one(t) for t in tenants))

    def retain(self, tenants: Iterable[Tenant]) -> int:
        """Forget entries whose credentials are no longer configured (a removed tenant or a rotated secret)."""
        keep = {t.credentials_key() for t in tenants}
        stale = [key for key in self._entries if key not in keep]
        for key in stale:
            entry = self._entries.pop(key)
            if entry.flight is not None:
                entry.flight.cancel()
        return len(stale)

    async def close(self) -> None:
        flights = [e.flight for e in self._entries.values() if e.flight is not None]
        for flight in flights:
            flight.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
