"""`st-proxy demo` as a newcomer runs it: the real command in a subprocess, its printed curl lines run as pasted."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

STARTUP = 30  # seconds: generous bounds, so a slow CI machine fails loudly rather than hanging
EXCHANGE = 20


def st_proxy() -> list[str]:
    script = Path(sys.executable).with_name("st-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "st_proxy"]


async def start_demo() -> asyncio.subprocess.Process:
    """`st-proxy demo` on free loopback ports, its output piped, without a config file from the environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ST_PROXY_CONFIG", None)
    return await asyncio.create_subprocess_exec(
        *st_proxy(),
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )


async def printed_lines(proc: asyncio.subprocess.Process) -> list[str]:
    """Everything the demo prints up to and including its "Ctrl-C" line."""
    assert proc.stdout is not None
    lines = []
    async with asyncio.timeout(STARTUP):
        while True:
            raw = await proc.stdout.readline()
            assert raw, f"the demo exited before it was ready: {lines}"
            lines.append(raw.decode().rstrip("\n"))
            if "Ctrl-C" in lines[-1]:
                return lines


async def run(argv: list[str], shell: bool = False) -> tuple[int, str]:
    """Run a printed line; returns curl's exit code and its stdout."""
    if shell:
        proc = await asyncio.create_subprocess_shell(argv[0], stdout=asyncio.subprocess.PIPE)
    else:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(EXCHANGE):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode()


async def curl(line: str) -> tuple[int, str]:
    """The printed line as argv (shlex, the trailing comment dropped), plus an option that prints the status."""
    argv = shlex.split(line, comments=True)
    assert argv[0] == "curl"
    code, out = await run([*argv, "-w", "\n%{http_code}"])
    assert code == 0, f"curl failed ({code}): {line}"
    body, _, status = out.rpartition("\n")
    return int(status), body


async def test_the_demo_answers_its_own_printed_curl_lines_and_stops_cleanly_on_ctrl_c():
    assert shutil.which("curl"), "the demo's instructions are curl lines; this test needs curl installed"
    proc = await start_demo()
    try:
        printed = await printed_lines(proc)
        curls = [line.strip() for line in printed if line.strip().startswith("curl ")]
        assert len(curls) >= 3, printed

        status, body = await curl(curls[0])
        assert status == 200, body
        assert json.loads(body)["data"], body

        unknown = next(line for line in curls if "unknown tenant" in line)
        status, body = await curl(unknown)
        assert status == 403
        assert json.loads(body)["type"].endswith("unknown_tenant")

        for line in curls:  # every other line works as pasted, pipes included
            if "|" in line:
                code, out = await run([line], shell=True)
                assert code == 0 and out.strip(), line
            elif line not in (curls[0], unknown):
                status, body = await curl(line)
                assert status == 200, f"{line}: {status} {body}"

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(EXCHANGE):
            _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
