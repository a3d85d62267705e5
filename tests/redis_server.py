"""A real Redis for the limits tests: Debian's `redis-server`, on a free loopback port, with a password, no
persistence, stopped and started again on the same port by the tests that take it away.

Missing binary: a failure (CI's .ci/run installs the `redis-server` package), unless ST_PROXY_ALLOW_NO_REDIS=1 asks
for a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

ALLOW_MISSING = "ST_PROXY_ALLOW_NO_REDIS"
PASSWORD = "redis-pw-do-not-print-4d2c"
DEADLINE = 10.0  # seconds for redis-server to accept connections; an upper bound, never a timing assertion


def redis_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found:
        return found
    message = f"redis-server is not installed: apt-get install redis-server, or set {ALLOW_MISSING}=1 to skip"
    if os.environ.get(ALLOW_MISSING) == "1":
        pytest.skip(message)
    pytest.fail(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, server key), made with the openssl command line."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=limits test CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext")  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


class RedisServer:
    def __init__(self, directory: Path, *, tls: bool = False) -> None:
        self.binary = redis_binary()
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = make_tls_files(directory) if tls else None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        if self.tls:
            return redis.Redis(
                host="127.0.0.1", port=self.port, password=PASSWORD, socket_timeout=2, ssl=True,
                ssl_ca_certs=str(self.tls[0]),
            )  # fmt: skip
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, socket_timeout=2)

    def start(self) -> None:
        listen = ["--port", str(self.port)]
        if self.tls:
            ca, cert, key = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]  # fmt: skip
        self.proc = subprocess.Popen(
            [
                self.binary,
                *listen,
                "--bind", "127.0.0.1",
                "--requirepass", PASSWORD,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--loglevel", "warning",
                "--enable-debug-command", "local",  # DEBUG SLEEP: a Redis that answers too slowly
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + DEADLINE
        while True:
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise AssertionError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(DEADLINE)
        self.proc = None


@pytest.fixture
def tls_redis_server(tmp_path):
    server = RedisServer(tmp_path, tls=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
