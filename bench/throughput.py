"""Throughput and latency of the proxy against the bundled simulator, measured with wrk (Debian's `wrk` package).

Runs three real processes on loopback: `st-proxy simulate`, `st-proxy serve` in front of it, and wrk. Reports
requests per second and latency percentiles through the proxy, and the same request sent straight to the simulator
(with a token fetched once by hand) as the baseline. Everything is bounded: each wrk run lasts --seconds.

    .venv/bin/python bench/throughput.py [--seconds 10] [--connections 50] [--log-level info] [--clients]

--clients adds a client (docs/security.md) and measures the proxy again with callers authenticating by Basic and by
a local token from POST /connect/token, next to the unauthenticated run.

Not run by CI. The machine's two cores are shared by all three processes, so the absolute numbers are a floor.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from st_proxy.devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS

BIN = Path(sys.executable).with_name("st-proxy")
BENCH_SECRET = "bench-client-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str]) -> dict[str, str]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    result = {"rps": re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)}
    for pct in ("50", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        result[f"p{pct}"] = match.group(1) if match else "?"
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = errors.group(1) if errors else "0"
    result["requests"] = re.search(r"(\d+) requests in", out).group(1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--clients", action="store_true", help="also measure Basic and local-token callers")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    sim_port, data_port, admin_port = free_port(), free_port(), free_port()
    tenant = DEMO_TENANTS[0]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": f"127.0.0.1:{data_port}",
                    "admin_listen": f"127.0.0.1:{admin_port}",
                    "app_key": {"value": DEMO_APP_KEY},
                    "environments": {
                        "sim": {
                            "auth_url": f"http://127.0.0.1:{sim_port}/connect/token",
                            "api_url": f"http://127.0.0.1:{sim_port}",
                        }
                    },
                    "tenants": {
                        t.tenant_id: {
                            "environment": "sim",
                            "client_id": t.client_id,
                            "client_secret": {"value": t.client_secret},
                        }
                        for t in DEMO_TENANTS
                    },
                    **(
                        {"clients": {"bench": {"secret": {"value": BENCH_SECRET}, "tenants": ["*"]}}}
                        if args.clients
                        else {}
                    ),
                }
            )
        )
        try:
            procs.append(
                subprocess.Popen([BIN, "simulate", "--listen", f"127.0.0.1:{sim_port}"], stdout=subprocess.DEVNULL)
            )
            wait_http(f"http://127.0.0.1:{sim_port}/_sim/stats", time.monotonic() + 15)
            procs.append(
                subprocess.Popen(
                    [BIN, "serve", "--config", str(config), "--log-level", args.log_level], stdout=subprocess.DEVNULL
                )
            )
            wait_http(f"http://127.0.0.1:{admin_port}/readyz", time.monotonic() + 15)

            path = f"/crm/v2/tenant/{tenant.tenant_id}/customers/42"
            form = urllib.parse.urlencode(
                {
                    "grant_type": "client_credentials",
                    "client_id": tenant.client_id,
                    "client_secret": tenant.client_secret,
                }
            ).encode()
            with urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/connect/token", data=form) as resp:
                token = json.load(resp)["access_token"]
            direct = wrk(
                f"http://127.0.0.1:{sim_port}{path}",
                args.seconds,
                args.connections,
                {"Authorization": f"Bearer {token}", "ST-App-Key": DEMO_APP_KEY},
            )
            runs = {"direct": direct}
            if args.clients:
                basic = "Basic " + base64.b64encode(f"bench:{BENCH_SECRET}".encode()).decode()
                runs["proxied-basic"] = wrk(
                    f"http://127.0.0.1:{data_port}{path}", args.seconds, args.connections, {"Authorization": basic}
                )
                local = urllib.parse.urlencode(
                    {"grant_type": "client_credentials", "client_id": "bench", "client_secret": BENCH_SECRET}
                ).encode()
                with urllib.request.urlopen(f"http://127.0.0.1:{data_port}/connect/token", data=local) as resp:
                    bearer = "Bearer " + json.load(resp)["access_token"]
                runs["proxied-token"] = wrk(
                    f"http://127.0.0.1:{data_port}{path}", args.seconds, args.connections, {"Authorization": bearer}
                )
            else:
                runs["proxied"] = wrk(f"http://127.0.0.1:{data_port}{path}", args.seconds, args.connections, {})
            with urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/_sim/stats") as resp:
                stats = json.load(resp)
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    print(
        f"wrk -t2 -c{args.connections} -d{args.seconds}s, GET {path}, proxy log level {args.log_level}, "
        f"{os.cpu_count()} cores shared by wrk, proxy and simulator"
    )
    print(f"{'':14} {'req/s':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'requests':>9} {'non-2xx':>8}")
    for name, r in runs.items():
        print(f"{name:14} {r['rps']:>9} {r['p50']:>9} {r['p90']:>9} {r['p99']:>9} {r['requests']:>9} {r['non_2xx']:>8}")
    print(f"token requests at the simulator during the run: {stats['token_requests']} (1 by hand + prewarm)")


if __name__ == "__main__":
    main()
