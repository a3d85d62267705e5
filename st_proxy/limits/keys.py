"""What a request spends, and how long an upstream 429 holds it.

ServiceTitan counts its 60 requests per second per application per tenant, so a budget is keyed by (environment, app
key, tenant): a tenant moved to a new app key has a budget of its own. Report-data calls have their own limit, a few
runs of the same report per minute per tenant, and do not spend the 60/s budget.
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import re
import time
from collections.abc import Mapping

from ..config import Tenant
from ..config.limits import LimitsConfig
from .budget import Rate

# POST /reporting/v2/tenant/{t}/report-category/{c}/reports/{r}/data runs a report (ServiceTitan's Reporting API).
REPORT_DATA = re.compile(r"/reporting/v\d+/tenant/\d+/report-category/([^/]+)/reports/([^/]+)/data/?")
SAFE_PART = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_HOLD = 1.0  # seconds, when a 429 carries no usable Retry-After
MAX_HOLD = 60.0  # a Retry-After longer than this is capped: a wrong header must not stop a tenant for hours


def _part(text: str) -> str:
    # Parts of a caller's path go into a key: kept readable when they are plain ids, else reduced to a digest.
    return text if SAFE_PART.fullmatch(text) else hashlib.sha256(text.encode()).hexdigest()[:16]


def report_of(method: str, path: str) -> str | None:
    """``category/report`` when this is a report-data call, else None."""
    if method != "POST":
        return None
    found = REPORT_DATA.fullmatch(path)
    return f"{_part(found[1])}/{_part(found[2])}" if found else None


def budget(method: str, path: str, tenant: Tenant, limits: LimitsConfig) -> tuple[str, Rate]:
    """(the budget key, its rate) for this request."""
    base = f"{tenant.environment.name}:{tenant.app_key.fingerprint()}:{tenant.tenant_id}"
    report = report_of(method, path)
    if report is not None:
        per_minute = limits.reports_per_minute
        return f"r:{base}:{report}", Rate(per_minute / 60 if per_minute else None, 1)
    return f"b:{base}", Rate(tenant.rate_per_second or limits.rate_per_second, limits.burst)


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float:
    """Seconds to hold after a 429: its ``Retry-After`` (RFC 9110 section 10.2.3: seconds or an HTTP date), 1 s when
    absent or unreadable, at most 60 s."""
    value = headers.get("Retry-After", "").strip()
    seconds: float | None = None
    if value.isascii() and value.isdigit():
        seconds = float(value)
    elif value:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds is None or not math.isfinite(seconds):
        return DEFAULT_HOLD
    return min(MAX_HOLD, max(0.0, seconds))
