"""Staying under ServiceTitan's limits (docs/limits.md): per-tenant pacing (GCRA), a per-process concurrency cap per
tenant, holds after an upstream 429, and the pacing state in-process or shared through Redis.

    budget.py       the GCRA arithmetic and the in-process budgets (the injected clock)
    redis_state.py  the same budgets in Redis: one Lua script, one round trip per request
    state.py        which of the two answers: Redis while it is reachable, else the local fallback
    slots.py        the per-process concurrency slots per tenant
    keys.py         what a request spends: the tenant's budget or a report's; Retry-After
    limiter.py      the limit step of the request path, and the upstream 429 handling
    metrics.py      the metrics that exist when `limits` is configured

Nothing here imports server/ or the request path's steps (only ``http.exchange.CallerGone``): the handler calls
``Limiter.admit`` and ``server/app.py`` wires it.
"""
