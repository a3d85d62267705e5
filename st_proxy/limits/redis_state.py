"""The budgets in Redis, shared by every process with the same config: one Lua script per operation, so a request
costs one atomic round trip (reserve-if-it-fits and the hold check together).

Times are Redis' own clock (``TIME``) in whole microseconds, so processes on hosts whose clocks disagree still share
one schedule; the process only ever receives a relative wait. Keys expire once they hold nothing any more. No token
or secret is ever written: keys name the environment, a one-way fingerprint of the app key and the tenant id.
"""

from __future__ import annotations

import ssl
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..config.limits import StateConfig
from .budget import Rate, Verdict

_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 't', 'h')
local tat = tonumber(state[1]) or now
local hold = tonumber(state[2]) or 0
local function store(t, h)
  redis.call('HSET', KEYS[1], 't', string.format('%.0f', t), 'h', string.format('%.0f', h))
  redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(t, h) - now) / 1000) + 1000)
end
"""
# ARGV: interval (us), burst, max wait (us). Returns {reserved 0|1, wait (us), mark}.
RESERVE = (
    _NOW
    + """
local interval, burst, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tat < now then tat = now end
local new_tat = tat + interval
local send_at = math.max(now, new_tat - burst * interval, hold)
local wait = send_at - now
if wait > max_wait then return {0, wait, 0} end
store(new_tat, hold)
return {1, wait, string.format('%.0f', new_tat)}
"""
)
# ARGV: interval (us), burst, hold (us).
HOLD = (
    _NOW
    + """
local interval, burst, ends = tonumber(ARGV[1]), tonumber(ARGV[2]), now + tonumber(ARGV[3])
store(math.max(tat, ends + (burst - 1) * interval), math.max(hold, ends))
return 1
"""
)
HELD = _NOW + "\nreturn math.max(0, hold - now)\n"
# ARGV: interval (us), mark.
REFUND = (
    _NOW
    + """
if state[1] and state[1] == ARGV[2] then store(tat - tonumber(ARGV[1]), hold) return 1 end
return 0
"""
)
US = 1_000_000


def _us(seconds: float) -> int:
    return round(seconds * US)


def client(state: StateConfig) -> Redis:
    """A client for ``state.redis_url``: no retries of its own (the caller falls back instead), timeouts of
    ``timeout_ms`` for connecting and for every reply."""
    assert state.redis_url is not None
    timeout = state.timeout_ms / 1000
    options: dict[str, Any] = {}
    if state.redis_url.startswith("rediss://"):
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if state.ca_file:
            options["ssl_ca_certs"] = state.ca_file
    return Redis.from_url(
        state.redis_url,
        password=state.password.reveal() if state.password else None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **options,
    )


class RedisBudgets:
    def __init__(self, redis: Redis, key_prefix: str) -> None:
        self.redis = redis
        self._prefix = key_prefix
        self._reserve = redis.register_script(RESERVE)
        self._hold = redis.register_script(HOLD)
        self._held = redis.register_script(HELD)
        self._refund = redis.register_script(REFUND)

    async def reserve(self, key: str, rate: Rate, max_wait: float) -> Verdict:
        ok, wait, mark = await self._reserve(
            keys=[self._prefix + key], args=[_us(rate.interval), rate.burst, _us(max_wait)]
        )
        return Verdict(bool(ok), int(wait) / US, float(mark) if ok else None)

    async def hold(self, key: str, rate: Rate, seconds: float) -> None:
        await self._hold(keys=[self._prefix + key], args=[_us(rate.interval), rate.burst, _us(seconds)])

    async def held_for(self, key: str) -> float:
        return int(await self._held(keys=[self._prefix + key])) / US

    async def refund(self, key: str, rate: Rate, mark: float | None) -> None:
        if mark is not None:
            await self._refund(keys=[self._prefix + key], args=[_us(rate.interval), f"{mark:.0f}"])

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()
