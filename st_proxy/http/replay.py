"""Send, and after an upstream 401 replay once with a new token (docs/tokens.md, "Upstream 401").

ServiceTitan answers 401 both for a token it no longer accepts and for an app-key problem. Only the first can be
fixed by a new token: its problem ``title`` tells them apart ("Application key ..." for the app key).
"""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web

from ..config import Config, Tenant
from ..ops.metrics import Metrics
from ..upstream.token_client import Token
from ..upstream.tokens import TokenManager
from .body import Body
from .exchange import Exchange
from .send import Sender

APP_KEY_TITLE = "Application key"  # ServiceTitan's app-key 401s: a new token cannot fix them (docs/servicetitan.md)
ERROR_BODY_LIMIT = 64 * 1024  # ServiceTitan's problem bodies are a few hundred bytes


async def send_with_replay(
    sender: Sender,
    tokens: TokenManager,
    metrics: Metrics,
    request: web.Request,
    config: Config,
    tenant: Tenant,
    token: Token,
    body: Body,
    replayable: bool,
    ex: Exchange,
) -> tuple[aiohttp.ClientResponse, bytes]:
    """(the answer to relay, the bytes of its body already read)."""
    upstream = await sender.send(request, config, tenant, token, body, ex)
    if upstream.status != 401:
        return upstream, b""
    try:
        # Read the problem body (bounded) to tell an app-key 401 from a token 401.
        error_body = b""
        try:
            while len(error_body) < ERROR_BODY_LIMIT:
                chunk = await upstream.content.read(ERROR_BODY_LIMIT - len(error_body))
                if not chunk:
                    break
                error_body += chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise sender.failed(exc, tenant)[1] from None
        if upstream.content.at_eof():
            upstream.release()  # free the pool slot before waiting on a token: other tenants must not queue behind
        try:
            problem = json.loads(error_body)
        except (ValueError, RecursionError):  # any bytes: JSON nested too deep for the decoder raises RecursionError
            problem = None
        title = problem.get("title") if isinstance(problem, dict) else None
        if isinstance(title, str) and title.startswith(APP_KEY_TITLE):
            return upstream, error_body
        # Dropped only if it is still the current token (identity): a 401 for an old token keeps a newer one. Also
        # when this request cannot be replayed, so that the next one gets a fresh token.
        tokens.invalidate(tenant, token)
        if not replayable:  # the body was streamed upstream and is gone: the caller gets the 401 and may retry
            return upstream, error_body
        fresh = await tokens.get(tenant)  # through the same single flight as every other caller
        if fresh is token:  # no newer token to try (tokens.INVALIDATE_MIN_INTERVAL): a replay would be the same
            return upstream, error_body
        upstream.release()
        tokens.record_replay(tenant)
        metrics.token_replayed(tenant.tenant_id)
    except BaseException:
        # Any way out without handing the answer on (an error, or the caller hanging up while a fresh token is
        # awaited: CancelledError) must free it, or its pooled connection stays taken until read_timeout.
        upstream.release()
        raise
    return await sender.send(request, config, tenant, fresh, body, ex), b""  # a second 401 goes back as it is
