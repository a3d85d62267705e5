"""The current config, swapped atomically.

A started ``web.Application`` is frozen (design.md section 6), so the config lives in a holder stored on the app and
reload swaps the value inside it. A request reads ``holder.current`` once and keeps that config to its end.
"""

from __future__ import annotations

from .config import Config


class ConfigHolder:
    def __init__(self, config: Config) -> None:
        self.current = config
        self.generation = 0

    def swap(self, config: Config) -> Config:
        old, self.current = self.current, config
        self.generation += 1
        return old
