"""The ``metrics`` section: how much per-tenant detail ``/metrics`` carries (docs/scaling.md).

Fixed at start like ``tokens`` (``server/reload.py``): the metric families are registered once, and a family cannot
change its label names while Prometheus is scraping it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricsConfig:
    # The duration histograms cost ~34 series per tenant with the tenant label; with thousands of tenants that is most
    # of a scrape. False keeps the histograms under the same names without the label (sum by le works either way).
    tenant_histograms: bool = True


FIELDS = {"tenant_histograms": "bool"}
