"""The current config, swapped atomically; re-read when its files change or on SIGHUP (docs/operations.md).

A started ``web.Application`` is frozen (aiohttp refuses changes to it), so the config lives in a holder stored on the app and
reload swaps the value inside it. A request reads ``holder.current`` once and keeps that config to its end, so
in-flight requests finish on the config they started with while new ones get the new config.

``Reloader`` polls the config file and every secret file it references (``file_watch.py``; Kubernetes' ``..data``
symlink swap included) and re-reads them on SIGHUP. A valid new config is swapped in; an invalid one (bad YAML, a
failed validation, a missing secret file) is logged on one line with every problem, counted as
``st_proxy_config_reloads_total{result="failure"}``, and the previous config stays in force.

What a reload cannot change: the sockets are bound and the client sessions, token client and shutdown timeouts are
built once at start, so ``listen``, ``admin_listen``, ``upstream``, ``tokens``, ``shutdown``, ``metrics`` (the metric
families' label names are fixed once registered) and ``state`` (the Redis connection, docs/limits.md) keep their
start-up values until a restart; a reload that changes them says so in a warning and applies everything else.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from ..config import Config, ConfigError
from ..config import tls as tls_sections
from ..config.file_watch import FileWatch, snapshots
from ..config.security import exposure
from ..ops.metrics import Metrics
from ..upstream.tokens import TokenManager

log = logging.getLogger("st_proxy.reload")

FIXED_AT_START = ("listen", "admin_listen", "upstream", "tokens", "shutdown", "metrics", "state")
DEFAULT_POLL_SECONDS = 1.0


class ConfigHolder:
    def __init__(self, config: Config) -> None:
        self.current = config

    def swap(self, config: Config) -> Config:
        old, self.current = self.current, config
        return old


def _pin_fixed(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the start-up-only sections taken from ``old``, and the names of those that differed."""
    changed = [name for name in FIXED_AT_START if getattr(old, name) != getattr(new, name)]
    if changed:
        new = replace(new, **{name: getattr(old, name) for name in changed})
    new, listeners = tls_sections.pin_listeners(old, new)
    return new, changed + listeners


class Reloader:
    """Re-reads the config (``load``) when a watched file changes or SIGHUP arrives, and applies a valid result.

    ``load`` is ``None`` in no-file mode: the environment is fixed at start, so there is nothing to re-read.
    ``check_now()`` and ``reload_now()`` let tests drive it without waiting for a poll.
    Each of ``preparers`` builds what a new config needs (a TLS context from renewed files) before anything is
    swapped, in a worker thread like the load, and returns the step that puts it in place (run on the loop, at the
    swap); a ``ConfigError`` from one fails the whole reload.
    """

    def __init__(
        self,
        holder: ConfigHolder,
        metrics: Metrics,
        *,
        tokens: Callable[[], TokenManager | None],
        load: Callable[[], Config] | None,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        preparers: Sequence[Callable[[Config], Callable[[], None]]] = (),
    ) -> None:
        self.holder = holder
        self._preparers = preparers
        self._metrics = metrics
        self._tokens = tokens
        self._load = load
        self._poll_seconds = poll_seconds
        self._lock = asyncio.Lock()
        self._watch = FileWatch()
        self._tasks: set[asyncio.Task[object]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._signals = False
        # Named by the last config that failed to load: in Kubernetes the ConfigMap naming a new tenant's secret file
        # often lands before the Secret that holds it, and the reload must be retried when it appears.
        self._failed_refs: tuple[Path, ...] = ()
        if load is not None:
            self._watch.watch(self._candidate_paths())

    @property
    def watched(self) -> tuple[Path, ...]:
        return self._watch.paths

    # -- running ------------------------------------------------------------------------------------------------
    def start(self, *, handle_sighup: bool = True) -> None:
        """Start polling the files (with a config file) and reloading on SIGHUP."""
        if self._load is not None and self._poll_seconds > 0:
            self._poller = asyncio.create_task(self._poll(), name="config-watch")
        if handle_sighup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._signals = True

    async def close(self) -> None:
        if self._signals:
            # Ignore, not default: SIGHUP's default action would kill a process still draining requests.
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: None)
            self._signals = False
        tasks = [t for t in (self._poller, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._poller = None

    def _on_sighup(self) -> None:
        self._spawn(self.reload_now("SIGHUP"), "config-reload")

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.check_now()
            except Exception:  # never let one bad look stop the watching
                log.exception("config watch: checking the files failed", extra={"event": "config_watch_error"})

    # -- the work -----------------------------------------------------------------------------------------------
    async def check_now(self) -> bool | None:
        """Reload if a watched file changed: True (applied), False (rejected), None (nothing changed)."""
        if self._load is None:
            return None
        # The stat calls in a worker thread: with thousands of secret files they take milliseconds every poll.
        changed = self._watch.compare(await asyncio.to_thread(snapshots, self._watch.paths))
        if not changed:
            return None
        return await self.reload_now("changed: " + ", ".join(str(p) for p in changed))

    async def reload_now(self, trigger: str = "request") -> bool:
        """Re-read the config now and apply it if valid. True when applied."""
        if self._load is None:
            log.info(
                "%s: no config file (no-file mode): the environment is read once at start, nothing to re-read",
                trigger,
                extra={"event": "config_reload_skipped", "trigger": trigger},
            )
            return False
        async with self._lock:
            # Snapshots before the read: a change made while loading shows up at the next look instead of being lost.
            self._watch.watch(self._candidate_paths())
            try:
                # Off the loop: reading, parsing and validating thousands of tenants must not stall the requests.
                new = await asyncio.to_thread(self._load)
            except ConfigError as exc:
                self._failed_refs = exc.files
                missing = [p for p in exc.files if p not in self._watch.paths]
                if missing:
                    self._watch.watch([*self._watch.paths, *missing])
                return self._failed(trigger, exc.problems)
            except Exception as exc:  # a bug must not take the running config down with it
                return self._failed(trigger, [f"unexpected {type(exc).__name__} while loading"])
            new, fixed = _pin_fixed(self.holder.current, new)
            self._failed_refs = ()
            refused = _still_closed(self.holder.current, new)
            if refused:
                return self._failed(trigger, refused)
            try:
                # Off the loop too: a preparer reads and parses certificate and key files (the TLS context, the CA).
                commits = await asyncio.to_thread(lambda: [prepare(new) for prepare in self._preparers])
            except ConfigError as exc:
                return self._failed(trigger, exc.problems)
            self._watch.add([*new.secret_files, *tls_sections.watched_files(new)])
            self._apply(new, trigger, fixed, commits)
            # After the swap, in steps: thousands of added or removed tenants' series must not hold the loop.
            await self._metrics.set_tenants_stepwise(new.tenants)
            return True

    def _candidate_paths(self) -> list[Path]:
        current = self.holder.current
        paths: list[Path] = []
        if current.source is not None:
            paths.append(current.source)
        paths.extend(current.secret_files)
        paths.extend(tls_sections.watched_files(current))
        paths.extend(self._failed_refs)
        return paths

    def _failed(self, trigger: str, problems: list[str]) -> bool:
        self._metrics.config_reloaded(ok=False)
        # ConfigError problems name paths and sources, never a value (config.py), so the line is safe to log.
        log.error(
            "config reload (%s) failed, keeping the previous config: %s",
            trigger,
            "; ".join(problems),
            extra={"event": "config_reload_failed", "trigger": trigger, "problems": problems},
        )
        return False

    def _apply(self, new: Config, trigger: str, fixed: list[str], commits: list[Callable[[], None]]) -> None:
        old = self.holder.current
        if fixed:
            log.warning(
                "config reload: %s cannot change while running; keeping the values from start-up until a restart",
                ", ".join(fixed),
                extra={"event": "config_reload_restart_needed", "keys": fixed},
            )
        for warning in new.warnings:
            log.warning("config: %s", warning, extra={"event": "config_warning"})
        old_keys = {t.credentials_key() for t in old.tenants.values()}
        fresh = [t for t in new.tenants.values() if t.credentials_key() not in old_keys]

        # No await between these: a request sees the old config with its tokens, or the new one, never a mix.
        self.holder.swap(new)
        for commit in commits:
            commit()
        self._metrics.clients.set_clients(new.clients)
        tokens = self._tokens()
        dropped = tokens.retain(new.tenants.values()) if tokens is not None else 0
        self._metrics.config_reloaded(ok=True)

        added = sorted(set(new.tenants) - set(old.tenants), key=int)
        removed = sorted(set(old.tenants) - set(new.tenants), key=int)
        rotated = sorted((t.tenant_id for t in fresh if t.tenant_id in old.tenants), key=int)
        log.info(
            "config reloaded (%s): %d tenants, added %s, removed %s, credentials changed %s",
            trigger,
            len(new.tenants),
            _ids(added),
            _ids(removed),
            _ids(rotated),
            extra={
                "event": "config_reloaded",
                "trigger": trigger,
                "tenants": len(new.tenants),
                "tenants_added": added,
                "tenants_removed": removed,
                "credentials_changed": rotated,
                "tokens_dropped": dropped,
            },
        )
        if tokens is not None and fresh:
            # New credentials get their first token in the background, as at start-up, so the first request for a
            # new tenant usually finds one ready.
            self._spawn(tokens.prewarm(fresh), "token-prewarm-reload")


def _still_closed(old: Config, new: Config) -> list[str]:
    """The closed-by-default rule against the listener that is bound (``listen`` keeps its start-up value), so a
    reload can never leave a non-loopback data port without caller authentication (docs/security.md)."""
    refused, _ = exposure(
        old.listen,
        clients=len(new.clients),
        client_certificates=tls_sections.authenticates_callers(new.tls),
        security=new.security,
        tls=new.tls is not None,
    )
    forward, _ = tls_sections.forward_proxy_exposure(new.forward_proxy, clients=len(new.clients), security=new.security)
    return refused + forward


def _ids(ids: Iterable[str]) -> str:
    return ",".join(ids) or "none"
