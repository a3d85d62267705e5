"""Helpers the bench scenarios share: child processes on loopback, configs, load generators, /proc readings, tables.

Every child process started here is registered with a `Processes` stack, which stops it (SIGTERM, then SIGKILL after
a deadline) when the scenario ends, however it ends. Every wait has a deadline; every load loop is bounded both in
time and in count.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS

START_DEADLINE = 20.0  # seconds for a child to come up on a loaded two-core machine
STOP_DEADLINE = 30.0  # seconds a child gets to drain after SIGTERM before SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")


def st_proxy_command() -> list[str]:
    """The `st-proxy` console script next to this interpreter, else `python -m st_proxy`."""
    script = Path(sys.executable).with_name("st-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "st_proxy"]


def free_port() -> int:
    """A loopback port that was free a moment ago (for children that cannot report a port-0 bind, like nginx)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- child processes -------------------------------------------------------------------------------------------


class Child:
    """A child process whose stdout (and stderr) is read by a thread, so its pipe never fills."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], what: str, deadline: float = START_DEADLINE) -> str:
        """The first output line matching ``predicate``, waiting up to ``deadline`` seconds for it."""
        end = time.monotonic() + deadline
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {what}:\n{self.output()}")
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name}: no {what} within {deadline:g} s:\n{self.output()}")
                self._changed.wait(min(left, 0.5))

    def output(self, last: int = 40) -> str:
        return "\n".join(self.lines[-last:])

    def stop(self, deadline: float = STOP_DEADLINE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


class Processes(contextlib.AbstractContextManager):
    """The children a scenario started; leaving the ``with`` block stops them, last started first."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], **kwargs: Any) -> Child:
        child = Child(name, argv, **kwargs)
        self.children.append(child)
        return child

    def __exit__(self, *exc_info: object) -> None:
        while self.children:
            self.children.pop().stop()


@dataclass
class Simulator:
    child: Child
    url: str


def start_simulator(procs: Processes, *extra: str) -> Simulator:
    """`st-proxy simulate` on a loopback port of its choosing; ``extra`` are more command-line options."""
    child = procs.start("simulator", [*st_proxy_command(), "simulate", "--listen", "127.0.0.1:0", *extra])
    line = child.wait_line(lambda s: s.startswith("ServiceTitan simulator:"), "its address line")
    return Simulator(child, line.split(": ", 1)[1].strip())


@dataclass
class Proxy:
    child: Child
    url: str
    admin_url: str

    def events(self) -> list[dict]:
        """The proxy's JSON log records so far."""
        records = []
        for line in list(self.child.lines):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


def write_config(
    directory: Path, *, auth_url: str, api_url: str, tenants: Iterable = DEMO_TENANTS, **sections: object
) -> Path:
    """A config for the demo tenants, listening on loopback ports of the proxy's choosing (JSON is YAML)."""
    raw = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"sim": {"auth_url": auth_url, "api_url": api_url}},
        "tenants": {
            t.tenant_id: {"environment": "sim", "client_id": t.client_id, "client_secret": {"value": t.client_secret}}
            for t in tenants
        },
        **sections,
    }
    path = directory / "config.yaml"
    path.write_text(json.dumps(raw, indent=2))
    return path


def start_proxy(procs: Processes, config: Path, *, log_level: str = "info", argv: Sequence[str] | None = None) -> Proxy:
    """`st-proxy serve` (or ``argv``, which must log the same `start` line); returns once /readyz answers 200."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ST_")}  # the config file only
    command = argv or [*st_proxy_command(), "serve", "--config", str(config), "--log-level", log_level]
    child = procs.start("st-proxy", command, env=env)
    start = json.loads(child.wait_line(lambda s: '"event": "start"' in s, "its start log line"))
    proxy = Proxy(child, f"http://{start['listen']}", f"http://{start['admin_listen']}")
    wait_http(f"{proxy.admin_url}/readyz")
    return proxy


def wait_http(url: str, deadline: float = START_DEADLINE, want: int = 200) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == want:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer {want} within {deadline:g} s")


def get_json(url: str, data: bytes | None = None) -> Any:
    with urllib.request.urlopen(url, data=data, timeout=10) as resp:
        return json.load(resp)


# ---- /proc ------------------------------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of ``pid`` in KiB, from /proc/PID/status (Linux only)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used, from /proc/PID/stat fields 14 and 15 (proc(5))."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---- load generators --------------------------------------------------------------------------------------------


@dataclass
class Load:
    """What one bounded load run saw; latencies in milliseconds."""

    requests: int
    seconds: float
    p50: float
    p90: float
    p99: float
    non_2xx: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk(url: str, *, seconds: int, connections: int, threads: int = 2, headers: dict[str, str] | None = None) -> Load:
    """Debian's `wrk` for ``seconds`` with ``connections`` keep-alive connections."""
    cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    return parse_wrk(out)


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNIT_MS[unit]


def parse_wrk(out: str) -> Load:
    """wrk's `--latency` report as a `Load` (latency percentiles converted to milliseconds)."""
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    if done is None:
        raise ValueError(f"not a wrk report:\n{out}")
    pct = {p: _ms(m.group(1)) for p in ("50", "90", "99") if (m := re.search(rf"^\s+{p}%\s+(\S+)", out, re.M))}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return Load(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        p50=pct.get("50", float("nan")),
        p90=pct.get("90", float("nan")),
        p99=pct.get("99", float("nan")),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
    )


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def _drive(
    urls: Sequence[str], seconds: float, max_requests: int, concurrency: int, headers: dict[str, str] | None = None
) -> Load:
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    errors = sent = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def worker() -> None:
            nonlocal sent, errors
            while time.monotonic() < deadline and sent < max_requests:
                url = urls[sent % len(urls)]
                sent += 1
                started = time.perf_counter()
                try:
                    async with session.get(url, headers=headers) as resp:
                        await resp.read()
                        statuses[resp.status] += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append((time.perf_counter() - started) * 1000)

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    latencies.sort()
    return Load(
        requests=sent,
        seconds=elapsed,
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        non_2xx=sum(n for status, n in statuses.items() if not 200 <= status < 400),
        errors=errors,
        statuses=dict(statuses),
    )


def python_load(
    urls: str | Sequence[str],
    *,
    seconds: float,
    max_requests: int,
    concurrency: int,
    headers: dict[str, str] | None = None,
) -> Load:
    """The bundled load generator (aiohttp): GETs over ``urls`` in turn, until ``seconds`` or ``max_requests``.

    Slower than wrk (it shares the Python interpreter's costs), but needs nothing installed.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    return asyncio.run(_drive(urls, seconds, max_requests, concurrency, headers))


# ---- output -----------------------------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        first, *rest = row
        lines.append("  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def load_row(name: str, load: Load) -> list[object]:
    return [name, load.rps, load.p50, load.p90, load.p99, load.requests, load.non_2xx + load.errors]


LOAD_HEADER = ["", "req/s", "p50 ms", "p90 ms", "p99 ms", "requests", "failed"]


def start_redis(procs: Processes, directory: Path | str, password: str) -> int:
    """A throwaway redis-server on a free loopback port, no persistence; its port once it answers PING."""
    port = free_port()
    procs.start(
        "redis",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, "--save", "",
         "--appendonly", "no", "--dir", str(directory)],
    )  # fmt: skip
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=password)
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            client.ping()
            return port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
