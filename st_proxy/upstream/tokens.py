"""TokenManager: when to fetch a tenant's token, and when to reuse it (docs/tokens.md).

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
- An upstream 401 drops the token only if it is still the current one (identity), and at most once per
  ``INVALIDATE_MIN_INTERVAL`` per entry: an API that refuses every fresh token must not turn each request into a token
  request (ServiceTitan throttles its token endpoint, docs/servicetitan.md).
- Prewarm (start-up and reloads) fetches tenants' first tokens in the background, ``prewarm_concurrency`` at a time and
  paced by ``pacing.Pacer`` at ``prewarm_rate_per_second``. Every other fetch (a request for a tenant not yet warmed,
  a refresh, a retry) starts at once, ahead of the prewarm queue, and books its slot with the pacer so prewarm yields.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..config import Tenant, TokenConfig
from ..errors import TokenRejected, TokenUnavailable
from .pacing import Pacer, Sleep
from .token_client import Token, TokenRequestFailed

log = logging.getLogger("st_proxy.tokens")

BACKOFF_FIRST = 1.0  # docs/tokens.md: 1 s doubling to 60 s
BACKOFF_MAX = 60.0
RETRY_AFTER_MAX = 600.0  # a server's Retry-After is honoured up to this; a bogus one must not stop retries for hours
INVALIDATE_MIN_INTERVAL = 30.0  # at most one 401-triggered refetch per entry in this many seconds
REFRESH_FRACTION = 0.5  # short tokens: refresh starts no earlier than half-way through the lifetime
SKEW_FRACTION = 0.25  # short tokens: the skew never eats more than a quarter of the lifetime

Key = tuple[str, str, str, str]


class Fetcher(Protocol):
    async def fetch(self, tenant: Tenant) -> Token: ...


class TokenObserver(Protocol):
    def token_fetched(self, tenant_id: str, outcome: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class TokenStatus:
    """What ``/tenants`` shows of an entry: never the token itself."""

    state: str  # none | valid | refreshing | rejected | backing_off
    expires_at: float | None
    last_fetch: float | None  # when the last token request finished, whatever its outcome
    last_error: str | None  # the OAuth error code or the proxy's own code (timeout, connect_error, http_503, ...)


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
    invalidated_at: float | None = None  # the last time an upstream 401 dropped this entry's token
    attempted: asyncio.Event = field(default_factory=asyncio.Event)  # the first attempt has finished


class TokenManager:
    def __init__(
        self,
        fetcher: Fetcher,
        settings: TokenConfig,
        *,
        clock: Callable[[], float] = time.time,
        observer: TokenObserver | None = None,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._fetcher = fetcher
        self.settings = settings
        self._clock = clock
        self._observer = observer
        self._rng = rng or random.Random()
        self._entries: dict[Key, TokenEntry] = {}
        self._retired: set[Key] = set()  # dropped by the last retain(): never cached again
        self._configured: set[Key] | None = None  # kept by the last retain(); None: everything asked for is wanted
        self._pacer = Pacer(settings.prewarm_rate_per_second, clock=clock, sleep=sleep)
        self._replays: collections.Counter[str] = collections.Counter()  # by tenant id: survives a rotation
        self._closed = False

    # -- reading ------------------------------------------------------------------------------------------------
    def entry(self, tenant: Tenant) -> TokenEntry:
        key = tenant.credentials_key()
        entry = self._entries.get(key)
        if entry is None:
            entry = TokenEntry(tenant)
            # A request that read the config before a reload retired these credentials still gets a token, but the
            # entry is not kept: nothing would ever drop it again.
            if key not in self._retired:
                self._entries[key] = entry
        return entry

    def skew(self, token: Token) -> float:
        return min(self.settings.expiry_skew_seconds, token.lifetime * SKEW_FRACTION)

    def usable(self, token: Token | None, now: float) -> bool:
        return token is not None and now < token.expires_at - self.skew(token)

    def refresh_due(self, token: Token, now: float) -> bool:
        window = min(self.settings.refresh_ahead_seconds, token.lifetime * REFRESH_FRACTION)
        return now >= token.expires_at - window

    def status(self, tenant: Tenant) -> TokenStatus:
        entry = self._entries.get(tenant.credentials_key())
        if entry is None:
            return TokenStatus("none", None, None, None)
        token = entry.token
        if entry.flight is not None:
            state = "refreshing"
        elif entry.rejected:
            state = "rejected"
        elif entry.failures:
            state = "backing_off"
        elif self.usable(token, self._clock()):
            state = "valid"
        else:
            state = "none"
        return TokenStatus(state, token.expires_at if token else None, entry.last_fetch, entry.last_error)

    def attempted(self, tenant: Tenant) -> bool:
        entry = self._entries.get(tenant.credentials_key())
        return entry is not None and entry.attempted.is_set()

    def replays(self, tenant_id: str) -> int:
        return self._replays[tenant_id]

    # -- the request path ---------------------------------------------------------------------------------------
    async def get(self, tenant: Tenant) -> Token:
        """A token fit to send now, or TokenRejected / TokenUnavailable."""
        entry = self.entry(tenant)
        now = self._clock()
        token = entry.token
        if token is not None and self.usable(token, now):
            if self.refresh_due(token, now) and entry.flight is None and now >= entry.retry_at and not self._closed:
                self._start(entry)  # in the background: this caller and the next keep the current token
            return token
        if entry.flight is None:
            if now < entry.retry_at:
                raise self._refusal(entry, now)
            if self._closed:
                raise TokenUnavailable("the proxy is shutting down", tenant=tenant.tenant_id, retry_after=BACKOFF_FIRST)
            self._start(entry)
        flight = entry.flight
        assert flight is not None
        try:
            return await asyncio.shield(flight)  # cancelling this caller cancels its wait, not the shared fetch
        except TokenRequestFailed:
            raise self._refusal(entry, self._clock()) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if flight.cancelled() and task is not None and not task.cancelling():
                # The fetch itself was abandoned (its entry was retired by a reload, or shutdown), not this caller.
                raise TokenUnavailable(
                    "the token request was abandoned; try again", tenant=tenant.tenant_id, retry_after=BACKOFF_FIRST
                ) from None
            raise

    def invalidate(self, tenant: Tenant, token: Token) -> bool:
        """Drop ``token`` after an upstream 401, if it is still the current one (by identity) and the entry has not
        dropped one within ``INVALIDATE_MIN_INTERVAL``. True when it was dropped."""
        entry = self._entries.get(tenant.credentials_key())
        if entry is None or entry.token is not token:
            return False
        now = self._clock()
        if entry.invalidated_at is not None and now - entry.invalidated_at < INVALIDATE_MIN_INTERVAL:
            return False
        entry.token, entry.invalidated_at = None, now
        log.info(
            "tenant %s: upstream refused the token (401); fetching a new one",
            tenant.tenant_id,
            extra={"event": "token_invalidated", "tenant": tenant.tenant_id},
        )
        return True

    def record_replay(self, tenant: Tenant) -> None:
        self._replays[tenant.tenant_id] += 1

    def _refusal(self, entry: TokenEntry, now: float) -> TokenRejected | TokenUnavailable:
        tenant_id = entry.tenant.tenant_id
        if entry.rejected:
            return TokenRejected(
                f"the token endpoint refused the tenant's credentials ({entry.last_error})", tenant=tenant_id
            )
        return TokenUnavailable(
            f"no token for the tenant: the token endpoint is failing ({entry.last_error})",
            tenant=tenant_id,
            retry_after=max(entry.retry_at - now, BACKOFF_FIRST),
        )

    # -- the single flight --------------------------------------------------------------------------------------
    def _start(self, entry: TokenEntry, *, booked: bool = False) -> None:
        if not booked:
            self._pacer.take()  # someone needs this token now: it goes at once, and prewarm's next turn moves back
        entry.flight = asyncio.get_running_loop().create_task(
            self._fetch(entry), name=f"token-fetch-{entry.tenant.tenant_id}"
        )
        # Retrieve the exception even when no caller is waiting (a background refresh), so asyncio stays quiet.
        entry.flight.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _fetch(self, entry: TokenEntry) -> Token:
        tenant_id = entry.tenant.tenant_id
        started = time.perf_counter()
        try:
            try:
                token = await asyncio.wait_for(
                    self._fetcher.fetch(entry.tenant), timeout=self.settings.fetch_timeout_seconds
                )
            except TokenRequestFailed:
                raise
            except TimeoutError:
                raise TokenRequestFailed(
                    "timeout", "no token answer within tokens.fetch_timeout_seconds", rejected=False
                ) from None
            except Exception as exc:  # a bug or an unforeseen error is still a transient failure: keep retrying
                raise TokenRequestFailed(
                    "fetch_error", f"token request failed ({type(exc).__name__})", rejected=False
                ) from None
        except TokenRequestFailed as failure:
            self._failed(entry, failure)
            self._observe(tenant_id, "rejected" if failure.rejected else "error", started)
            raise
        finally:
            entry.flight = None
            entry.last_fetch = self._clock()
            entry.attempted.set()
        if entry.failures or entry.rejected:
            log.info(
                "tenant %s: token fetch recovered", tenant_id, extra={"event": "token_recovered", "tenant": tenant_id}
            )
        entry.token, entry.rejected, entry.failures, entry.retry_at, entry.last_error = token, False, 0, 0.0, None
        self._observe(tenant_id, "success", started)
        return token

    def _failed(self, entry: TokenEntry, failure: TokenRequestFailed) -> None:
        now = self._clock()
        tenant_id = entry.tenant.tenant_id
        # One log line per state change (docs/tokens.md), not one per attempt or per refused request.
        changed = entry.last_error != failure.code or entry.rejected != failure.rejected
        entry.last_error = failure.code
        if failure.rejected:
            entry.rejected, entry.failures = True, 0
            entry.retry_at = now + self.settings.rejected_cooloff_seconds
            if changed:
                log.warning(
                    "tenant %s: token endpoint rejected the credentials (%s); no new attempt for %ss",
                    tenant_id,
                    failure.code,
                    self.settings.rejected_cooloff_seconds,
                    extra={"event": "token_rejected", "tenant": tenant_id, "error": failure.code},
                )
            return
        entry.rejected = False
        entry.failures += 1
        step = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(entry.failures - 1, 16))
        delay = self._rng.uniform(step / 2, step)
        if failure.retry_after is not None and failure.retry_after > delay:
            delay = min(failure.retry_after, RETRY_AFTER_MAX)
        entry.retry_at = now + delay
        if changed:
            log.warning(
                "tenant %s: token fetch failed (%s); backing off, retrying on demand",
                tenant_id,
                failure.code,
                extra={"event": "token_backing_off", "tenant": tenant_id, "error": failure.code},
            )

    def _observe(self, tenant_id: str, outcome: str, started: float) -> None:
        if self._observer is not None:
            self._observer.token_fetched(tenant_id, outcome, time.perf_counter() - started)

    # -- start-up, reload, shutdown -----------------------------------------------------------------------------
    async def prewarm(self, tenants: Iterable[Tenant]) -> None:
        """Fetch each tenant's first token, ``prewarm_concurrency`` at a time, each after its turn with the pacer.

        Failures are recorded, not raised. A tenant that got its first token meanwhile (on demand), whose credentials a
        reload has dropped, or whose fetch is already in flight costs nothing here: 5,000 tenants are one pass over a
        shared iterator, with no task per tenant.
        """
        queue = iter(list(tenants))  # a snapshot: the caller's config may be swapped by a reload meanwhile

        async def worker() -> None:
            for tenant in queue:  # shared by the workers: each takes the next tenant when it is free
                await self._warm(tenant)

        await asyncio.gather(*(worker() for _ in range(self.settings.prewarm_concurrency)))

    def _needs_warming(self, tenant: Tenant) -> bool:
        key = tenant.credentials_key()
        if self._closed or key in self._retired or (self._configured is not None and key not in self._configured):
            return False
        entry = self._entries.get(key)
        return entry is None or (not entry.attempted.is_set() and entry.flight is None)

    async def _warm(self, tenant: Tenant) -> None:
        if not self._needs_warming(tenant):
            return
        await self._pacer.turn()
        if not self._needs_warming(tenant):  # checked again: an on-demand fetch may have come first while we waited
            return
        entry = self.entry(tenant)
        self._start(entry, booked=True)
        assert entry.flight is not None
        await asyncio.wait([entry.flight])  # its outcome is recorded on the entry; a cancelled one is a reload's

    def skip_prewarm(self, tenants: Iterable[Tenant]) -> None:
        """Count ``tenants`` as attempted without fetching (an app started with prewarm off, in tests)."""
        for tenant in tenants:
            self.entry(tenant).attempted.set()

    async def wait_attempted(self, tenants: Iterable[Tenant]) -> None:
        """Until every one of ``tenants`` has finished its first token attempt."""
        for tenant in tenants:
            await self.entry(tenant).attempted.wait()

    def retain(self, tenants: Iterable[Tenant]) -> int:
        """Forget entries whose credentials are no longer configured (a removed tenant or a rotated secret)."""
        tenants = list(tenants)
        keep = {t.credentials_key() for t in tenants}
        stale = [key for key in self._entries if key not in keep]
        self._retired = set(stale)
        self._configured = keep
        for key in stale:
            entry = self._entries.pop(key)
            if entry.flight is not None:
                entry.flight.cancel()  # its waiters get token_unavailable; a token from old credentials is useless
        ids = {t.tenant_id for t in tenants}
        for tenant_id in [t for t in self._replays if t not in ids]:
            del self._replays[tenant_id]
        return len(stale)

    async def idle(self) -> None:
        """Until no fetch is in flight (tests, shutdown); the fetches' own outcomes are recorded, not raised."""
        while flights := [e.flight for e in self._entries.values() if e.flight is not None]:
            await asyncio.gather(*flights, return_exceptions=True)

    async def close(self) -> None:
        self._closed = True  # no new fetch from here on, whoever asks
        pending = [e.flight for e in self._entries.values() if e.flight is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
