"""The ``check-config`` lines about callers: client names, their tenants and where their secrets come from."""

from __future__ import annotations

from ..config import Config


def security_summary(config: Config) -> list[str]:
    """Never a value: names, tenant ids and secret sources only."""
    sec = config.security
    if not config.clients:
        lines = ["clients: none (callers are not authenticated)"]
    else:
        lines = [f"clients: {len(config.clients)}"]
        for client in sorted(config.clients.values(), key=lambda c: c.name):
            tenants = "every tenant (*)" if client.tenants is None else ", ".join(sorted(client.tenants, key=int))
            sources = ", ".join(ref.describe() for ref in client.secret_refs)
            lines.append(
                f"  {client.name}: tenants {tenants}; secret{'s' if len(client.secret_refs) > 1 else ''} from {sources}"
            )
    signing = f"from {sec.token_signing_key_ref.describe()}" if sec.token_signing_key_ref else "derived per client"
    admin = f"from {sec.admin_token_ref.describe()}" if sec.admin_token_ref else "none"
    lines.append(
        f"security: require_header {sec.require_header or '(none)'}, local tokens {sec.local_token_ttl_seconds:g}s "
        f"(signing key {signing}), max_body_bytes {sec.max_body_bytes if sec.max_body_bytes is not None else '(none)'}, "
        f"/tenants {'exposed' if sec.tenants_exposed(config.admin_listen) else 'hidden'}, admin_token {admin}"
        + (", allow_unauthenticated" if sec.allow_unauthenticated else "")
    )
    return lines
