"""Peak memory of the proxy process while a large upload and a large download stream through it.

Runs `st-proxy simulate` and `st-proxy serve` as child processes on loopback, then uploads --mb MiB to the simulator's
`echo` resource and downloads --mb MiB from its `download` resource, both through the proxy, checking length and
sha256. Reports the proxy's VmHWM (peak resident set, from /proc/PID/status, Linux only) after start-up and after each
transfer. A proxy that read bodies whole would grow by about the body size.

    .venv/bin/python bench/run.py stream_memory [--mb 50]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import common

from st_proxy.devtools.simulator import DEMO_TENANTS, DOWNLOAD_PATTERN

SCENARIO = "stream_memory"
HELP = "the proxy's peak memory (VmHWM) while a large upload and download stream through it"

MiB = 2**20
TENANT = DEMO_TENANTS[0].tenant_id
TRANSFER_DEADLINE = 300.0  # seconds per transfer: a bound, not a measurement


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=int, default=50, help="size of each transfer in MiB")


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
    if resp.status != 200 or (answer["body_length"], answer["body_sha256"]) != (size, digest.hexdigest()):
        raise RuntimeError(f"upload came back wrong: {resp.status} {answer}")
    return seconds


async def download(session: aiohttp.ClientSession, url: str, size: int) -> float:
    started = time.perf_counter()
    digest, length = hashlib.sha256(), 0
    async with session.get(f"{url}/crm/v2/tenant/{TENANT}/download?bytes={size}") as resp:
        if resp.status != 200:
            raise RuntimeError(f"download answered {resp.status}")
        async for chunk in resp.content.iter_chunked(MiB):
            digest.update(chunk)
            length += len(chunk)
    seconds = time.perf_counter() - started
    expected = hashlib.sha256((DOWNLOAD_PATTERN * (size // len(DOWNLOAD_PATTERN) + 1))[:size]).hexdigest()
    if (length, digest.hexdigest()) != (size, expected):
        raise RuntimeError(f"download came back wrong: {length} bytes")
    return seconds


async def measure(url: str, pid: int, mb: int) -> list[tuple[str, str, dict[str, int]]]:
    size = mb * MiB
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(f"{url}/crm/v2/tenant/{TENANT}/customers") as resp:
            if resp.status != 200:  # warm: token fetched, pools open
                raise RuntimeError(f"warm-up request answered {resp.status}")
        rows = [("after start-up and one request", "", common.memory_kib(pid))]
        async with asyncio.timeout(TRANSFER_DEADLINE):
            up = await upload(session, url, size)
        rows.append((f"after a {mb} MiB upload", f"{mb / up:.0f} MiB/s", common.memory_kib(pid)))
        async with asyncio.timeout(TRANSFER_DEADLINE):
            down = await download(session, url, size)
        rows.append((f"after a {mb} MiB download", f"{mb / down:.0f} MiB/s", common.memory_kib(pid)))
    return rows


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, common.Processes() as procs:
        sim = common.start_simulator(procs)
        config = common.write_config(Path(tmp), auth_url=f"{sim.url}/connect/token", api_url=sim.url)
        proxy = common.start_proxy(procs, config)
        pid = proxy.child.pid
        rows = asyncio.run(measure(proxy.url, pid, args.mb))
    print(f"proxy pid {pid}, Python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}")
    print(
        common.table(
            ["", "rate", "VmHWM (peak) MiB", "VmRSS MiB"],
            [(label, rate, f"{mem['VmHWM'] / 1024:.1f}", f"{mem['VmRSS'] / 1024:.1f}") for label, rate, mem in rows],
        )
    )
    return 0
