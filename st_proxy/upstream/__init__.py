"""Calls to ServiceTitan: the token client, the token manager (cache, single flight, backoff), egress proxies."""
