"""A real `st-proxy serve` child process for the reload, drain and image tests.

It listens on port 0; the ports come from its `start` log line. Its stdout (JSON log lines) is read continuously so the
pipe never fills, and every wait has a deadline: nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from st_proxy.devtools.simulator import DEMO_APP_KEY

DEADLINE = 20.0  # seconds: generous upper bound for a child on a loaded 2-core CI machine; never a timing assertion


class ServeProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.events: list[dict] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self.url = self.admin_url = ""

    @classmethod
    async def start(
        cls,
        config: Path,
        *,
        command: Sequence[str] | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> ServeProcess:
        argv = list(command) if command else [sys.executable, "-m", "st_proxy", "serve", "--config", str(config)]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        child = cls(proc)
        start = await child.wait_event("start")
        child.url = f"http://{start['listen']}"
        child.admin_url = f"http://{start['admin_listen']}"
        return child

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if isinstance(record, dict):
                self.events.append(record)
            self._changed.set()
        self._changed.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def with_event(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    async def wait_event(self, name: str, count: int = 1, deadline: float = DEADLINE) -> dict:
        """The ``count``-th log record with this event (waiting for it)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while len(found := self.with_event(name)) < count:
            if self._reader.done():
                raise AssertionError(f"st-proxy exited before logging {name!r}:\n{self.output()}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, end - loop.time()))
            except TimeoutError:
                raise AssertionError(f"no {name!r} log line within {deadline}s:\n{self.output()}") from None
        return found[count - 1]

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self, deadline: float = DEADLINE) -> int:
        code = await asyncio.wait_for(self.proc.wait(), deadline)
        await self._reader
        return code

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


async def poll_until(check, *, deadline: float = DEADLINE, interval: float = 0.05, what: str = "condition"):
    """Call the async ``check`` until it returns something truthy; fail after ``deadline`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > end:
            raise AssertionError(f"{what} did not happen within {deadline}s")
        await asyncio.sleep(interval)


def no_file_environment(simulator, tenant, **extra: str) -> dict[str, str]:
    """The environment of a child in no-file mode (ST_* variables only) serving ``tenant`` of ``simulator``."""
    return {
        "ST_APP_KEY": DEMO_APP_KEY,
        "ST_TENANT_ID": tenant.tenant_id,
        "ST_CLIENT_ID": tenant.client_id,
        "ST_CLIENT_SECRET": tenant.client_secret,
        "ST_AUTH_URL": simulator.auth_url,
        "ST_API_URL": simulator.base_url,
        "ST_PROXY_LISTEN": "127.0.0.1:0",
        "ST_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
        **extra,
        "ST_PROXY_CONFIG": "",
    }


def write_config(directory: Path, *, auth_url: str, api_url: str, tenants, app_key: str, **sections: object) -> Path:
    """A config file for a child process: listens on loopback port 0, secrets in files beside it."""
    import yaml

    secrets = directory / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "app_key").write_text(app_key + "\n")
    tenant_specs = {}
    for t in tenants:
        (secrets / f"{t.tenant_id}.client_secret").write_text(t.client_secret + "\n")
        tenant_specs[t.tenant_id] = {
            "environment": "sim",
            "client_id": t.client_id,
            "client_secret": {"file": str(secrets / f"{t.tenant_id}.client_secret")},
        }
    raw = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "app_key": {"file": str(secrets / "app_key")},
        "environments": {"sim": {"auth_url": auth_url, "api_url": api_url}},
        "tenants": tenant_specs,
        **sections,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
