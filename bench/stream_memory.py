"""Peak memory of the proxy process while a large upload and a large download stream through it.

Runs the real thing: `st-proxy simulate` and `st-proxy serve` as subprocesses on loopback, then sends an upload of
--mb MiB to the simulator's `echo` resource and downloads --mb MiB from its `download` resource, both through the
proxy, checking length and sha256. Reports the proxy's VmHWM (peak resident set, from /proc/<pid>/status, Linux only)
after start-up and after each transfer. A proxy that read bodies whole would grow by about the body size.

    .venv/bin/python bench/stream_memory.py [--mb 50]

Not run by CI: it measures, it does not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS, DOWNLOAD_PATTERN

MiB = 2**20
TENANT = DEMO_TENANTS[0].tenant_id


def st_proxy() -> list[str]:
    script = Path(sys.executable).with_name("st-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "st_proxy"]


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0])
    return fields


async def read_until(stream: asyncio.StreamReader, predicate, what: str) -> str:
    async with asyncio.timeout(30):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise RuntimeError(f"process exited before printing {what}")
            if predicate(line):
                return line


async def start_simulator() -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        *st_proxy(), "simulate", "--listen", "127.0.0.1:0", stdout=asyncio.subprocess.PIPE
    )
    line = await read_until(proc.stdout, lambda s: s.startswith("ServiceTitan simulator:"), "its address")
    return proc, line.split(": ", 1)[1].strip()


async def start_proxy(sim_url: str, config_dir: str) -> tuple[asyncio.subprocess.Process, str]:
    config = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"sim": {"auth_url": f"{sim_url}/connect/token", "api_url": sim_url}},
        "tenants": {
            t.tenant_id: {"environment": "sim", "client_id": t.client_id, "client_secret": {"value": t.client_secret}}
            for t in DEMO_TENANTS
        },
    }
    path = Path(config_dir, "bench.yaml")
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("ST_")}
    proc = await asyncio.create_subprocess_exec(
        *st_proxy(),
        "serve",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    line = await read_until(proc.stdout, lambda s: '"event": "start"' in s, "its start line")
    asyncio.get_running_loop().create_task(_drain(proc.stdout))  # access log lines: keep the pipe from filling
    return proc, f"http://{json.loads(line)['listen']}"


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def upload(session: aiohttp.ClientSession, url: str, size: int) -> float:
    block = os.urandom(MiB)
    digest = hashlib.sha256()

    async def body():
        sent = 0
        while sent < size:
            chunk = block[: min(MiB, size - sent)]
            digest.update(chunk)
            sent += len(chunk)
            yield chunk

    started = time.perf_counter()
    async with session.post(
        f"{url}/crm/v2/tenant/{TENANT}/echo", data=body(), headers={"Content-Length": str(size)}
    ) as resp:
        answer = await resp.json()
    seconds = time.perf_counter() - started
    assert resp.status == 200, answer
    assert (answer["body_length"], answer["body_sha256"]) == (size, digest.hexdigest()), answer
    return seconds


async def download(session: aiohttp.ClientSession, url: str, size: int) -> float:
    started = time.perf_counter()
    digest, length = hashlib.sha256(), 0
    async with session.get(f"{url}/crm/v2/tenant/{TENANT}/download?bytes={size}") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(MiB):
            digest.update(chunk)
            length += len(chunk)
    seconds = time.perf_counter() - started
    expected = hashlib.sha256((DOWNLOAD_PATTERN * (size // len(DOWNLOAD_PATTERN) + 1))[:size]).hexdigest()
    assert (length, digest.hexdigest()) == (size, expected)
    return seconds


async def main(mb: int) -> None:
    size = mb * MiB
    sim, sim_url = await start_simulator()
    proxy = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            proxy, url = await start_proxy(sim_url, tmp)
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                async with session.get(f"{url}/crm/v2/tenant/{TENANT}/customers") as resp:
                    assert resp.status == 200  # warm: token fetched, pools open
                rows = [("after start-up and one request", None, memory_kib(proxy.pid))]
                up = await upload(session, url, size)
                rows.append((f"after a {mb} MiB upload", f"{mb / up:.0f} MiB/s", memory_kib(proxy.pid)))
                down = await download(session, url, size)
                rows.append((f"after a {mb} MiB download", f"{mb / down:.0f} MiB/s", memory_kib(proxy.pid)))
    finally:
        for proc in (proxy, sim):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()
    print(f"proxy pid {proxy.pid}, Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}")
    print(f"{'':34} {'rate':>10} {'VmHWM (peak)':>14} {'VmRSS':>10}")
    for label, rate, mem in rows:
        print(f"{label:34} {rate or '':>10} {mem['VmHWM'] / 1024:>11.1f} MiB {mem['VmRSS'] / 1024:>6.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="size of each transfer in MiB (default 50)")
    asyncio.run(main(parser.parse_args().mb))
